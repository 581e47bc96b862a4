//! `cargo xtask bench`: the performance scenarios of issue 6, run on this
//! machine in network namespaces the bench creates (and always deletes).
//!
//! 1. scrape cost with N TIME_WAIT sockets from many remotes, against the
//!    usual `ss | awk | sed | sort | uniq -c` pipeline, interleaved, and the
//!    curve at N/10, N/4, N/2, N;
//! 2. kernel overhead: loopback connect/accept/close churn with and without
//!    the daemon, interleaved pairs, and each program's run time
//!    (`kernel.bpf_stats_enabled`);
//! 3. the daemon's CPU and RSS at steady state (N TIME_WAIT, a churn, a scrape
//!    every second);
//! 4. start-up with N TIME_WAIT already there: exec to `/readyz` 200;
//! 5. node_exporter's sockstat collector, scraped the same way, for reference;
//! 6. what the per-socket reconciliation walk and a scrape cost at N and 10 x N
//!    TIME_WAIT sockets (`reconcile.rs`), from which the default
//!    `--reconcile-interval` is chosen.
//!
//! `--smoke` runs the same code at small sizes, prints the table and leaves
//! BENCHMARKS.md alone; it fails only on errors, never on a missed target.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, sh, workspace_root};

mod reconcile;

/// Where the daemon listens inside each namespace.
const DAEMON: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 19868);
/// Where node_exporter listens inside its namespace.
const NODE_EXPORTER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);
/// The usual script: TIME_WAIT sockets grouped by peer address.
const SS_PIPELINE: &str = "ss -Htan state time-wait | awk '{print $4}' | sed 's/:[0-9]*$//' | sort | uniq -c";
/// Text kept across runs: everything in BENCHMARKS.md from this line on.
const KEEP_MARKER: &str = "<!-- Everything below this line is kept when `cargo xtask bench` rewrites the file. -->";

#[derive(Debug, Clone, Default, clap::Args)]
pub struct BenchArgs {
    /// Small sizes (2,000 sockets, 20 scrapes, short churn): same code paths, prints the table, does not write BENCHMARKS.md.
    #[arg(long)]
    pub smoke: bool,
    /// TIME_WAIT sockets for scenarios 1, 3 and 4 [default: 100000; smoke: 2000].
    #[arg(long, value_name = "N")]
    pub sockets: Option<usize>,
    /// Distinct remote addresses they come from (127.0.x.y) [default: 1000; smoke: 100].
    #[arg(long, value_name = "N")]
    pub remotes: Option<usize>,
    /// Scrapes of each kind at the largest size (a quarter of it at the smaller ones) [default: 200; smoke: 20].
    #[arg(long, value_name = "N")]
    pub scrapes: Option<usize>,
    /// Connections per churn run in scenario 2 [default: 60000; smoke: 3000].
    #[arg(long, value_name = "N")]
    pub churn_conns: Option<usize>,
    /// Interleaved (without, with) daemon pairs in scenario 2 [default: 5; smoke: 2].
    #[arg(long, value_name = "N")]
    pub pairs: Option<usize>,
    /// Seconds of steady state in scenario 3 [default: 20; smoke: 3].
    #[arg(long, value_name = "S")]
    pub steady_secs: Option<u64>,
    /// Connections per second of churn in scenario 3 [default: 10000; smoke: 1000].
    #[arg(long, value_name = "N")]
    pub churn_rate: Option<u64>,
    /// Client threads of the socket generator [default: 2 x CPUs].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Run only these scenarios (comma-separated, 1-6; 5 runs inside 1).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub only: Vec<u8>,
    /// Do not write BENCHMARKS.md (smoke never writes it).
    #[arg(long)]
    pub no_write: bool,
}

impl BenchArgs {
    /// `--smoke` with every other option at its default (for `xtask test`).
    pub fn smoke() -> Self {
        Self { smoke: true, ..Self::default() }
    }
}

/// Sizes resolved from the flags.
#[derive(Debug, Clone)]
struct Sizes {
    sockets: usize,
    remotes: usize,
    scrapes: usize,
    churn_conns: usize,
    pairs: usize,
    steady: Duration,
    churn_rate: u64,
    threads: usize,
}

impl Sizes {
    fn from(a: &BenchArgs) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pick = |v: Option<usize>, full: usize, smoke: usize| v.unwrap_or(if a.smoke { smoke } else { full });
        Sizes {
            sockets: pick(a.sockets, 100_000, 2_000).max(10),
            remotes: pick(a.remotes, 1_000, 100).clamp(1, 250 * 200),
            scrapes: pick(a.scrapes, 200, 20).max(4),
            churn_conns: pick(a.churn_conns, 60_000, 3_000).max(100),
            pairs: pick(a.pairs, 5, 2).max(1),
            steady: Duration::from_secs(a.steady_secs.unwrap_or(if a.smoke { 3 } else { 20 }).max(1)),
            churn_rate: a.churn_rate.unwrap_or(if a.smoke { 1_000 } else { 10_000 }).max(10),
            threads: a.threads.unwrap_or(2 * cpus).max(1),
        }
    }
}

/// One line of the result table.
struct Row {
    scenario: &'static str,
    measure: String,
    value: String,
    target: String,
    /// Some(true) met, Some(false) missed, None: no target.
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, scenario: &'static str, measure: impl Into<String>, value: impl Into<String>, target: &str, met: Option<bool>) {
        let r = Row { scenario, measure: measure.into(), value: value.into(), target: target.to_string(), met };
        eprintln!("bench: [{}] {}: {}{}", r.scenario, r.measure, r.value, verdict_suffix(&r));
        self.rows.push(r);
    }
    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench: note: {s}");
        self.notes.push(s);
    }
}

fn verdict_suffix(r: &Row) -> String {
    match r.met {
        Some(true) => format!("  (target {}: met)", r.target),
        Some(false) => format!("  (target {}: MISSED)", r.target),
        None => String::new(),
    }
}

fn verdict(r: &Row) -> &'static str {
    match r.met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "",
    }
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the bench creates network namespaces and loads eBPF programs: run it as root");
    }
    let sizes = Sizes::from(&args);
    setup::toolchain()?;
    sh(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args(["build", "--release", "--package", "timewait-daemon"]))?;
    let bin = workspace_root().join("target/release/timewaitd");
    let logs = workspace_root().join("target/bench");
    std::fs::create_dir_all(&logs)?;
    remove_stale_namespaces();
    let want = |n: u8| args.only.is_empty() || args.only.contains(&n);
    let started = Instant::now();
    let ctx = Ctx { bin, logs, sizes: sizes.clone() };
    let mut rep = Report::default();
    progress(format!("sizes: {sizes:?}"));
    let others = foreign_daemons();
    if !others.is_empty() {
        rep.note(format!(
            "other timewaitd processes were running on this host when the bench started (pids {others:?}): their eBPF programs fire for every namespace and add to both sides of scenario 2"
        ));
    }
    if want(1) || want(5) {
        scrape_cost(&ctx, &mut rep, want(5)).context("scenario 1 (scrape cost)")?;
    }
    if want(4) {
        startup(&ctx, &mut rep).context("scenario 4 (start-up)")?;
    }
    if want(3) {
        steady(&ctx, &mut rep).context("scenario 3 (steady state)")?;
    }
    if want(2) {
        overhead(&ctx, &mut rep).context("scenario 2 (kernel overhead)")?;
    }
    if want(6) {
        reconcile::reconcile(&ctx, &mut rep).context("scenario 6 (reconciliation and read cost)")?;
    }
    let table = render_table(&rep);
    println!("{table}");
    for n in &rep.notes {
        println!("- {n}");
    }
    let missed = rep.rows.iter().filter(|r| r.met == Some(false)).count();
    println!(
        "bench: {} rows, {missed} target(s) missed, {:.0} s",
        rep.rows.len(),
        started.elapsed().as_secs_f64()
    );
    if args.smoke || args.no_write || !args.only.is_empty() {
        progress("BENCHMARKS.md left as it is (smoke, --no-write or --only)");
    } else {
        write_markdown(&rep, &table, &sizes)?;
        progress("wrote BENCHMARKS.md");
    }
    Ok(())
}

struct Ctx {
    bin: PathBuf,
    logs: PathBuf,
    sizes: Sizes,
}

// ---------------------------------------------------------------- namespaces

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("twbench-{}-{tag}", std::process::id());
        quiet(Command::new("ip").args(["netns", "add", &name]))?;
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(f) => f,
            Err(e) => {
                let _ = quiet(Command::new("ip").args(["netns", "del", &name]));
                return Err(e).context("open /run/netns");
            }
        };
        let ns = Netns { name, file };
        quiet(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Room for the sockets: TIME_WAIT buckets and the whole port range.
    fn roomy(tag: &str, sockets: usize) -> Result<Self> {
        let ns = Self::new(tag)?;
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", &(sockets * 2).max(262_144).to_string())?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        Ok(ns)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        quiet(self.command("sysctl").args(["-qw", &format!("{key}={value}")]))
    }

    /// A command that runs inside the namespace (setns between fork and exec).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open while self lives,
        // and the command is spawned while self is borrowed.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Moves the calling thread into the namespace (worker threads only).
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: plain syscall on a valid fd; affects this thread only.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    fn within<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> std::io::Result<R> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
        })
    }

    /// Minisockets in the namespace (`tw` of /proc/net/sockstat: TIME_WAIT and FIN_WAIT2).
    fn tw_count(&self) -> Result<u64> {
        let text = self.within(|| std::fs::read_to_string("/proc/thread-self/net/sockstat"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("TCP: "))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.windows(2).find(|w| w[0] == "tw").and_then(|w| w[1].parse().ok())
            })
            .context("no tw in /proc/net/sockstat")
    }

    fn connect(&self, addr: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.within(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = quiet(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("bench: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Namespaces left by a bench that was killed (its pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("twbench-") else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if !Path::new(&format!("/proc/{pid}")).exists() {
            progress(format!("removing namespace {name} left by an earlier run"));
            let _ = quiet(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// timewaitd processes not started by this bench.
fn foreign_daemons() -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return v };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "timewaitd") {
            v.push(pid);
        }
    }
    v
}

// ------------------------------------------------------------------ processes

/// A child process, stopped (SIGTERM, then SIGKILL) on drop.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let f = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(Proc { what: what.to_string(), child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("{} exited ({st}); last lines of {}:\n{}", self.what, self.log.display(), tail.join("\n"));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// (VmRSS, VmHWM) in kB.
fn rss_kb(pid: u32) -> Result<(u64, u64)> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |k: &str| -> u64 {
        st.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((get("VmRSS:"), get("VmHWM:")))
}

// --------------------------------------------------------------------- HTTP

/// A keep-alive HTTP/1.1 client; the connection ends with an RST (SO_LINGER 0)
/// so that scraping leaves no TIME_WAIT in the namespace it measures.
struct Http {
    r: BufReader<TcpStream>,
    closed: bool,
}

impl Http {
    fn connect(ns: &Netns, addr: SocketAddrV4) -> std::io::Result<Self> {
        let s = ns.connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, 0)?;
        Ok(Http { r: BufReader::with_capacity(1 << 16, s), closed: false })
    }

    fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        write!(self.r.get_mut(), "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: timewait-bench\r\nAccept: */*\r\n\r\n")?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            self.closed = true;
            bail!("connection closed");
        }
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("bad status line")?;
        let (mut len, mut chunked) = (None, false);
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                    "connection" => self.closed |= v.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).context("bad chunk size")?;
                if n == 0 {
                    loop {
                        line.clear();
                        if self.r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let at = body.len();
                body.resize(at + n, 0);
                self.r.read_exact(&mut body[at..])?;
                let mut crlf = [0u8; 2];
                self.r.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            self.r.read_exact(&mut body)?;
        } else {
            self.r.read_to_end(&mut body)?;
            self.closed = true;
        }
        Ok((status, body))
    }
}

/// Scrapes one endpoint, reconnecting when the server closed; times each request.
struct Scraper<'a> {
    ns: &'a Netns,
    addr: SocketAddrV4,
    http: Option<Http>,
}

impl<'a> Scraper<'a> {
    fn new(ns: &'a Netns, addr: SocketAddrV4) -> Self {
        Scraper { ns, addr, http: None }
    }

    /// (milliseconds, body) of one successful GET.
    fn get(&mut self, path: &str) -> Result<(f64, Vec<u8>)> {
        let t = Instant::now();
        if self.http.as_ref().is_none_or(|h| h.closed) {
            self.http = Some(Http::connect(self.ns, self.addr).with_context(|| format!("connect {}", self.addr))?);
        }
        let http = self.http.as_mut().expect("just set");
        let res = http.get(path);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match res {
            Ok((200, body)) => Ok((ms, body)),
            Ok((st, body)) => bail!("{}{path} answered {st}: {}", self.addr, String::from_utf8_lossy(&body).trim()),
            Err(e) => {
                self.http = None;
                Err(e.context(format!("GET {}{path}", self.addr)))
            }
        }
    }
}

/// Sum of the samples of one metric (optionally only those whose labels contain `filter`).
fn metric_sum(body: &[u8], name: &str, filter: &str) -> f64 {
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts timewaitd in `ns` and waits for /readyz 200; returns it and the time that took.
fn start_daemon(ctx: &Ctx, ns: &Netns, tag: &str) -> Result<(Proc, Duration)> {
    start_daemon_with(ctx, ns, tag, &[])
}

fn start_daemon_with(ctx: &Ctx, ns: &Netns, tag: &str, extra: &[&str]) -> Result<(Proc, Duration)> {
    let mut cmd = ns.command(&ctx.bin);
    cmd.args(["run", "--web.listen-address", &DAEMON.to_string()]).args(extra);
    let t0 = Instant::now();
    let mut p = Proc::spawn("timewaitd", cmd, ctx.logs.join(format!("timewaitd-{tag}.log")))?;
    let deadline = t0 + Duration::from_secs(60);
    let mut http: Option<Http> = None;
    loop {
        if Instant::now() > deadline {
            bail!("timewaitd not ready after 60 s (log: {})", p.log.display());
        }
        p.check_alive()?;
        if http.as_ref().is_none_or(|h| h.closed) {
            http = Http::connect(ns, DAEMON).ok();
        }
        if let Some(h) = http.as_mut() {
            match h.get("/readyz") {
                Ok((200, _)) => return Ok((p, t0.elapsed())),
                Ok(_) => {}
                Err(_) => http = None,
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------- socket generator

fn set_int(fd: i32, level: i32, opt: i32, v: i32) -> std::io::Result<()> {
    let r = if opt == libc::SO_LINGER && level == libc::SOL_SOCKET {
        let l = libc::linger { l_onoff: 1, l_linger: v };
        // SAFETY: valid fd, correctly sized value.
        unsafe { libc::setsockopt(fd, level, opt, (&raw const l).cast(), size_of::<libc::linger>() as libc::socklen_t) }
    } else {
        // SAFETY: valid fd, correctly sized value.
        unsafe { libc::setsockopt(fd, level, opt, (&raw const v).cast(), size_of::<i32>() as libc::socklen_t) }
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// A client socket bound to `from` (port 0: chosen at connect time, thanks to
/// IP_BIND_ADDRESS_NO_PORT) and connected to `to`.
fn connect_from(from: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if from.port() == 0 {
        set_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    } else {
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let sa = sockaddr(from);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sa = sockaddr(to);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::connect(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(owned))
}

/// The i-th remote address: 127.0.(base + i / 250).(1 + i % 250).
fn remote(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, base.wrapping_add((i / 250) as u8), (i % 250) as u8 + 1)
}

/// Makes loopback connections where the server closes first, so each one
/// leaves a TIME_WAIT minisocket on the server side, keyed by the client's
/// address and port (the client, closing second, keeps nothing).
struct Generator<'a> {
    ns: &'a Netns,
    listener: TcpListener,
    server: SocketAddrV4,
}

#[derive(Default, Debug)]
struct GenStats {
    made: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

impl GenStats {
    fn rate(&self) -> f64 {
        self.made as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Which (source address, source port) the g-th connection uses.
#[derive(Clone)]
enum Sources {
    /// Remote g % n, ephemeral port.
    Ephemeral(Vec<Ipv4Addr>),
    /// A fixed set of (address, port) tuples, round-robin: after the first
    /// pass every SYN lands on the TIME_WAIT the previous pass left (accepted
    /// reuse), so the population stays constant while the churn goes on.
    Fixed(Vec<SocketAddrV4>),
}

impl Sources {
    fn get(&self, g: usize) -> SocketAddrV4 {
        match self {
            Sources::Ephemeral(v) => SocketAddrV4::new(v[g % v.len()], 0),
            Sources::Fixed(v) => v[g % v.len()],
        }
    }
}

impl<'a> Generator<'a> {
    fn new(ns: &'a Netns, port: u16) -> Result<Self> {
        let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let listener = ns.within(|| TcpListener::bind(server))?;
        // accept() gives up after 5 s instead of hanging the bench.
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: valid fd, correctly sized timeval.
        unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Generator { ns, listener, server })
    }

    /// `count` connections (or until `until`), at most `rate` per second.
    fn run(&self, sources: &Sources, count: usize, threads: usize, rate: Option<f64>, until: Option<Instant>) -> Result<GenStats> {
        let made = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let first_error = std::sync::Mutex::new(None::<String>);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (made, errors, stop, first_error) = (&made, &errors, &stop, &first_error);
                s.spawn(move || {
                    let fail = |e: String| {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    };
                    if let Err(e) = self.ns.enter() {
                        fail(format!("setns: {e}"));
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    let interval = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
                    let mut i = 0usize;
                    let mut consecutive = 0u32;
                    loop {
                        let g = t + i * threads;
                        if g >= count || stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
                            break;
                        }
                        if let Some(iv) = interval {
                            let due = t0 + iv * i as u32;
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                        }
                        i += 1;
                        match self.one(sources.get(g)) {
                            Ok(()) => {
                                made.fetch_add(1, Ordering::Relaxed);
                                consecutive = 0;
                            }
                            Err(e) => {
                                fail(e.to_string());
                                consecutive += 1;
                                if consecutive > 100 {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                });
            }
        });
        let st = GenStats {
            made: made.into_inner(),
            errors: errors.into_inner(),
            first_error: first_error.into_inner().unwrap_or_else(|p| p.into_inner()),
            elapsed: t0.elapsed(),
        };
        if st.errors > st.made / 100 + 10 {
            bail!(
                "socket generator: {} errors for {} connections (first: {})",
                st.errors,
                st.made,
                st.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(st)
    }

    /// One connection: connect, accept (maybe another thread's connection:
    /// every thread accepts exactly one per connect, so each gets closed),
    /// the server closes first, the client waits for that FIN, then closes.
    fn one(&self, from: SocketAddrV4) -> std::io::Result<()> {
        let mut c = connect_from(from, self.server)?;
        let (s, _) = self.listener.accept()?;
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 16];
        while c.read(&mut b)? != 0 {}
        Ok(())
    }
}

fn remotes(base: u8, n: usize) -> Vec<Ipv4Addr> {
    (0..n).map(|i| remote(base, i)).collect()
}

// ----------------------------------------------------------------- statistics

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[k - 1]
}

fn ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3} ms")
    } else if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn p50_p99(v: &[f64]) -> String {
    format!("p50 {} / p99 {}", ms(pct(v, 50.0)), ms(pct(v, 99.0)))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ------------------------------------------------------------------ scenarios

/// Runs the `ss` pipeline inside `ns`: (milliseconds, lines of output).
fn ss_pipeline(ns: &Netns) -> Result<(f64, usize)> {
    let t = Instant::now();
    let out = ns.command("sh").args(["-c", SS_PIPELINE]).stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("the ss pipeline failed ({})", out.status);
    }
    Ok((ms, out.stdout.iter().filter(|b| **b == b'\n').count()))
}

fn node_exporter_bin() -> Option<PathBuf> {
    ["/usr/bin/prometheus-node-exporter", "/usr/local/bin/node_exporter", "/usr/bin/node_exporter"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Debian's prometheus-node-exporter, installed when missing.
fn ensure_node_exporter() -> Result<PathBuf> {
    if let Some(p) = node_exporter_bin() {
        return Ok(p);
    }
    progress("node_exporter is missing: installing Debian's prometheus-node-exporter (apt-get)");
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "prometheus-node-exporter"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    node_exporter_bin().context("prometheus-node-exporter installed but no binary found")
}

fn start_node_exporter(ctx: &Ctx, ns: &Netns) -> Result<Proc> {
    let bin = ensure_node_exporter()?;
    let mut cmd = ns.command(bin);
    cmd.args(["--collector.disable-defaults", "--collector.sockstat", &format!("--web.listen-address={NODE_EXPORTER}")]);
    let mut p = Proc::spawn("node_exporter", cmd, ctx.logs.join("node_exporter.log"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        p.check_alive()?;
        if let Ok(mut h) = Http::connect(ns, NODE_EXPORTER)
            && matches!(h.get("/metrics"), Ok((200, _)))
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("node_exporter not answering after 20 s (log: {})", p.log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scenario 1 (and 5): scrape cost at N/10, N/4, N/2 and N TIME_WAIT sockets.
fn scrape_cost(ctx: &Ctx, rep: &mut Report, with_node: bool) -> Result<()> {
    const S: &str = "1 scrape";
    let z = &ctx.sizes;
    progress(format!("scenario 1: scrape cost, up to {} TIME_WAIT from {} remotes", z.sockets, z.remotes));
    let ns = Netns::roomy("scrape", z.sockets)?;
    let (daemon, _) = start_daemon(ctx, &ns, "scrape")?;
    let node = if with_node {
        match start_node_exporter(ctx, &ns) {
            Ok(p) => Some(p),
            Err(e) => {
                rep.note(format!("node_exporter not measured: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let generator = Generator::new(&ns, 8080)?;
    let sources = Sources::Ephemeral(remotes(1, z.remotes));
    let mut points: Vec<usize> = [z.sockets / 10, z.sockets / 4, z.sockets / 2, z.sockets].into();
    points.dedup();
    let mut made = 0usize;
    let first = Instant::now();
    let mut gen_time = Duration::ZERO;
    let mut topped = 0usize;
    let mut m = Scraper::new(&ns, DAEMON);
    let mut snap = Scraper::new(&ns, DAEMON);
    let mut nx = Scraper::new(&ns, NODE_EXPORTER);
    let mut curve = Vec::new();
    for &point in &points {
        // The generator numbers connections globally so the remotes stay balanced.
        let present = ns.tw_count()? as usize;
        let g = generator_range(&generator, &sources, made, made + point.saturating_sub(present), z.threads)?;
        gen_time += g.elapsed;
        progress(format!(
            "  {} TIME_WAIT sockets created in {:.1} s ({:.0}/s)",
            thousands(point as u64),
            g.elapsed.as_secs_f64(),
            g.rate()
        ));
        made += g.made as usize;
        if point == z.sockets {
            rep.row(S, format!("generator: {} TIME_WAIT from {} remotes", thousands(point as u64), z.remotes), format!("{:.1} s ({:.0} conn/s)", gen_time.as_secs_f64(), made as f64 / gen_time.as_secs_f64()), "", None);
        }
        let tw0 = ns.tw_count()?;
        let rounds = if point == z.sockets { z.scrapes } else { (z.scrapes / 4).max(4) };
        let (mut tm, mut ts, mut tss, mut tn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut body_len, mut snap_len, mut daemon_sum, mut ss_lines) = (0, 0, 0.0, 0);
        let t_round = Instant::now();
        let mut tw_min = tw0;
        for r in 0..rounds {
            // TIME_WAIT lasts 60 s: top the population up (outside the timed
            // requests) so that every round sees at least 98 % of it.
            let tw = ns.tw_count()?;
            tw_min = tw_min.min(tw);
            if tw < (point as u64) * 98 / 100 {
                let need = point - tw as usize;
                let g = generator_range(&generator, &sources, made, made + need, z.threads)?;
                made += g.made as usize;
                topped += g.made as usize;
            }
            // Interleaved, and the order rotates so that none always follows `ss`.
            for k in 0..4 {
                match (r + k) % 4 {
                    0 => {
                        let (t, b) = m.get("/metrics")?;
                        tm.push(t);
                        body_len = b.len();
                        daemon_sum = metric_sum(&b, "timewait_sockets", "");
                    }
                    1 => {
                        let (t, b) = snap.get("/api/v1/snapshot")?;
                        ts.push(t);
                        snap_len = b.len();
                    }
                    2 => {
                        let (t, lines) = ss_pipeline(&ns)?;
                        tss.push(t);
                        ss_lines = lines;
                    }
                    _ => {
                        if node.is_some() {
                            tn.push(nx.get("/metrics")?.0);
                        }
                    }
                }
            }
        }
        let tw1 = ns.tw_count()?;
        progress(format!(
            "  at {}: {rounds} rounds in {:.1} s, tw {tw0} -> {tw1} (lowest {tw_min}, {topped} topped up so far), daemon sums {daemon_sum}, ss {ss_lines} remotes; /metrics {}, ss {}, age of the oldest socket {:.0} s",
            thousands(point as u64),
            t_round.elapsed().as_secs_f64(),
            p50_p99(&tm),
            p50_p99(&tss),
            first.elapsed().as_secs_f64()
        ));
        if tw_min < (point as u64) * 95 / 100 || tw1 < (point as u64) * 95 / 100 {
            rep.note(format!(
                "at {point} sockets the kernel count was as low as {} before a top-up (TIME_WAIT timers expire in batches after 60 s); every round's requests ran after topping up to >= 98 %",
                tw_min.min(tw1)
            ));
        }
        curve.push((point, tw_min, tw1, tm.clone(), ts.clone(), tss.clone(), tn.clone(), body_len, daemon_sum));
        if point == z.sockets {
            let m99 = pct(&tm, 99.0);
            rep.row(S, format!("GET /metrics, {} rounds ({} B)", rounds, thousands(body_len as u64)), p50_p99(&tm), "p99 < 5 ms", Some(m99 < 5.0));
            rep.row(S, format!("GET /api/v1/snapshot ({} B)", thousands(snap_len as u64)), p50_p99(&ts), "", None);
            rep.row(S, format!("`ss` pipeline ({ss_lines} remotes)"), p50_p99(&tss), "", None);
            let ratio = pct(&tss, 50.0) / pct(&tm, 50.0);
            rep.row(S, "ss pipeline / GET /metrics (p50 / p50)", format!("{ratio:.0}x"), ">= 25x", Some(ratio >= 25.0));
            let ratio99 = pct(&tss, 99.0) / pct(&tm, 99.0);
            rep.row(S, "ss pipeline / GET /metrics (p99 / p99)", format!("{ratio99:.0}x"), "", None);
            if node.is_some() {
                rep.row("5 node_exporter", "GET /metrics, sockstat collector only", p50_p99(&tn), "", None);
            }
            rep.row(S, "daemon's timewait_sockets sum / kernel tw count", format!("{daemon_sum} / {tw0}..{tw1}"), "", None);
        }
    }
    // Flatness: /metrics p50 at the largest size against the smallest.
    let mut curve_text = String::from("| TIME_WAIT sockets (kernel count: lowest, at the end) | /metrics p50 | /metrics p99 | snapshot p50 | `ss` pipeline p50 | `ss` p99 | node_exporter p50 |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for (point, tw0, tw1, tm, ts, tss, tn, _, _) in &curve {
        let _ = writeln!(
            curve_text,
            "| {} ({}, {}) | {} | {} | {} | {} | {} | {} |",
            thousands(*point as u64),
            tw0,
            tw1,
            ms(pct(tm, 50.0)),
            ms(pct(tm, 99.0)),
            ms(pct(ts, 50.0)),
            ms(pct(tss, 50.0)),
            ms(pct(tss, 99.0)),
            if tn.is_empty() { "-".into() } else { ms(pct(tn, 50.0)) }
        );
    }
    if let (Some(lo), Some(hi)) = (curve.first(), curve.last()) {
        let growth = pct(&hi.3, 50.0) / pct(&lo.3, 50.0);
        let ss_growth = pct(&hi.5, 50.0) / pct(&lo.5, 50.0);
        rep.row(
            S,
            format!("flatness: /metrics p50 at {} / at {} sockets", thousands(hi.0 as u64), thousands(lo.0 as u64)),
            format!("{growth:.2}x (ss: {ss_growth:.1}x)"),
            "flat (< 1.5x)",
            Some(growth < 1.5),
        );
    }
    eprintln!("{curve_text}");
    if topped > 0 {
        curve_text.push_str(&format!(
            "\n{} connections were made during the measurement, outside the timed requests, to replace TIME_WAIT sockets that reached their 60 s.\n",
            thousands(topped as u64)
        ));
    }
    rep.notes.push(format!("Scrape cost curve (scenario 1):\n\n{curve_text}"));
    drop(daemon);
    drop(node);
    Ok(())
}

/// Connections number `from..to` (global numbering, so remotes stay balanced).
fn generator_range(g: &Generator<'_>, sources: &Sources, from: usize, to: usize, threads: usize) -> Result<GenStats> {
    let shifted = match sources {
        Sources::Ephemeral(v) => {
            let n = v.len();
            Sources::Ephemeral((0..n).map(|i| v[(i + from) % n]).collect())
        }
        Sources::Fixed(v) => {
            let n = v.len();
            Sources::Fixed((0..n).map(|i| v[(i + from) % n]).collect())
        }
    };
    g.run(&shifted, to - from, threads, None, None)
}

/// Scenario 4: start-up with N TIME_WAIT already there.
fn startup(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "4 start-up";
    let z = &ctx.sizes;
    progress(format!("scenario 4: start-up with {} TIME_WAIT already present", z.sockets));
    let ns = Netns::roomy("startup", z.sockets)?;
    let generator = Generator::new(&ns, 8080)?;
    let g = generator.run(&Sources::Ephemeral(remotes(1, z.remotes)), z.sockets, z.threads, None, None)?;
    progress(format!("  {} created in {:.1} s", g.made, g.elapsed.as_secs_f64()));
    let mut times = Vec::new();
    let mut loaded = Vec::new();
    for i in 0..3 {
        let tw = ns.tw_count()?;
        let (d, t) = start_daemon(ctx, &ns, &format!("startup{i}"))?;
        let (_, body) = Scraper::new(&ns, DAEMON).get("/metrics")?;
        let snap = metric_sum(&body, "timewait_snapshot_sockets_total", "");
        let sum = metric_sum(&body, "timewait_sockets", "") + metric_sum(&body, "timewait_fin_wait2_orphans", "");
        progress(format!("  start {i}: ready in {} with {tw} minisockets present; snapshot loaded {snap}, gauges sum {sum}", ms(t.as_secs_f64() * 1e3)));
        times.push(t.as_secs_f64() * 1e3);
        loaded.push((tw, snap));
        drop(d);
    }
    let worst = times.iter().copied().fold(0.0, f64::max);
    rep.row(
        S,
        format!("exec -> /readyz 200 with {} TIME_WAIT (3 starts)", thousands(loaded[0].0)),
        format!("median {} / max {}", ms(pct(&times, 50.0)), ms(worst)),
        "< 2 s",
        Some(worst < 2000.0),
    );
    rep.row(
        S,
        "start-up snapshot loaded (timewait_snapshot_sockets_total)",
        loaded.iter().map(|(tw, s)| format!("{s}/{tw}")).collect::<Vec<_>>().join(", "),
        "",
        None,
    );
    Ok(())
}

/// Scenario 3: N TIME_WAIT, a churn of R/s that keeps the population
/// constant (each SYN reuses a TIME_WAIT the previous pass left), a scrape
/// of /metrics every second; the daemon's CPU and memory.
fn steady(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "3 steady state";
    let z = &ctx.sizes;
    progress(format!(
        "scenario 3: {} TIME_WAIT, churn {}/s for {} s, /metrics every 1 s",
        z.sockets,
        z.churn_rate,
        z.steady.as_secs()
    ));
    let ns = Netns::roomy("steady", z.sockets + z.churn_rate as usize)?;
    let (daemon, _) = start_daemon(ctx, &ns, "steady")?;
    let pid = daemon.pid();
    let base = Generator::new(&ns, 8080)?;
    let g = base.run(&Sources::Ephemeral(remotes(1, z.remotes)), z.sockets, z.threads, None, None)?;
    progress(format!("  {} created in {:.1} s", g.made, g.elapsed.as_secs_f64()));
    // The churn: R tuples (10 addresses x R/10 ports), one pass per second.
    let per_addr = (z.churn_rate as usize).div_ceil(10);
    let tuples: Vec<SocketAddrV4> = (0..10)
        .flat_map(|a| (0..per_addr).map(move |p| SocketAddrV4::new(Ipv4Addr::new(127, 0, 240, a as u8 + 1), 20_000 + p as u16)))
        .collect();
    let churn = Generator::new(&ns, 8081)?;
    let mut scraper = Scraper::new(&ns, DAEMON);
    // Warm up: one pass creates the churn's own TIME_WAITs, so that the
    // measured window only sees reuse (kill + create) at a constant population.
    churn.run(&Sources::Fixed(tuples.clone()), tuples.len(), 2, None, None)?;
    let (_, before) = scraper.get("/metrics")?;
    let tw0 = ns.tw_count()?;
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    let until = t0 + z.steady;
    let mut scrape_ms = Vec::new();
    let mut body = Vec::new();
    let st = std::thread::scope(|s| -> Result<GenStats> {
        let h = s.spawn(|| churn.run(&Sources::Fixed(tuples.clone()), usize::MAX, 2, Some(z.churn_rate as f64), Some(until)));
        let mut next = t0;
        while Instant::now() < until {
            let (t, b) = scraper.get("/metrics")?;
            scrape_ms.push(t);
            body = b;
            next += Duration::from_secs(1);
            let now = Instant::now();
            if next > now {
                std::thread::sleep((next - now).min(until.saturating_duration_since(now)));
            }
        }
        h.join().map_err(|_| anyhow::anyhow!("churn thread panicked"))?
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu0;
    let tw1 = ns.tw_count()?;
    let (rss, hwm) = rss_kb(pid)?;
    let created = metric_sum(&body, "timewait_created_total", "") - metric_sum(&before, "timewait_created_total", "");
    let reused = metric_sum(&body, "timewait_closed_total", "reused_by_syn") - metric_sum(&before, "timewait_closed_total", "reused_by_syn");
    let cpu_pct = cpu / wall * 100.0;
    rep.row(
        S,
        format!("load: {} TIME_WAIT (kernel {tw0} -> {tw1}), churn", thousands(z.sockets as u64)),
        format!(
            "{:.0} conn/s for {:.0} s ({} created, {} reused by SYN per the daemon; {} errors)",
            st.rate(),
            wall,
            created,
            reused,
            st.errors
        ),
        "",
        None,
    );
    rep.row(S, format!("daemon CPU (utime+stime / wall, {} scrapes of /metrics)", scrape_ms.len()), format!("{cpu_pct:.2} % of one core ({cpu:.2} s)"), "< 2 %", Some(cpu_pct < 2.0));
    rep.row(
        S,
        "daemon memory (VmRSS / VmHWM)",
        format!("{:.1} MB / {:.1} MB", rss as f64 / 1024.0, hwm as f64 / 1024.0),
        "< 50 MB",
        Some((hwm as f64 / 1024.0) < 50.0),
    );
    rep.row(S, "GET /metrics during the churn", p50_p99(&scrape_ms), "", None);
    drop(daemon);
    Ok(())
}

/// (program name, run_time_ns, run_cnt).
type ProgStats = Vec<(String, u64, u64)>;

/// Restores kernel.bpf_stats_enabled on drop.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Result<Self> {
        let prev = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?.trim().to_string();
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        Ok(BpfStats(prev))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0) {
            eprintln!("bench: cannot restore kernel.bpf_stats_enabled={}: {e}", self.0);
        }
    }
}

/// Ids of the BPF programs `pid` holds a file descriptor to (from
/// /proc/PID/fdinfo: this bpftool is built without its `pids` feature).
fn prog_ids(pid: u32) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// (name, run_time_ns, run_cnt) of the programs held by `pid`.
fn prog_stats(pid: u32) -> Result<ProgStats> {
    let ids = prog_ids(pid)?;
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!("bpftool prog show failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    let mut res = Vec::new();
    for p in v.as_array().context("bpftool: not an array")? {
        let by_pid = p["pids"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(u64::from(pid))));
        let by_fd = p["id"].as_u64().is_some_and(|id| ids.contains(&id));
        if !(by_pid || by_fd) {
            continue;
        }
        res.push((
            p["name"].as_str().unwrap_or("?").to_string(),
            p["run_time_ns"].as_u64().unwrap_or(0),
            p["run_cnt"].as_u64().unwrap_or(0),
        ));
    }
    res.sort();
    Ok(res)
}

/// One churn run in a fresh namespace: conn/s, and the programs' stats when asked.
fn churn_run(ctx: &Ctx, with_daemon: bool, tag: &str, stats: bool) -> Result<(f64, ProgStats)> {
    let z = &ctx.sizes;
    let ns = Netns::roomy(tag, z.churn_conns)?;
    let daemon = if with_daemon { Some(start_daemon(ctx, &ns, tag)?.0) } else { None };
    let g = Generator::new(&ns, 8080)?;
    let sources = Sources::Ephemeral(remotes(101, 10));
    // Let the namespace and the daemon settle.
    std::thread::sleep(Duration::from_millis(300));
    let st = g.run(&sources, z.churn_conns, z.threads, None, None)?;
    let progs = match (&daemon, stats) {
        (Some(d), true) => prog_stats(d.pid())?,
        _ => Vec::new(),
    };
    drop(daemon);
    drop(g);
    drop(ns);
    // Namespace teardown (freeing the TIME_WAITs) runs in a kernel worker: let it finish.
    std::thread::sleep(Duration::from_millis(1500));
    Ok((st.rate(), progs))
}

/// Scenario 2: throughput of a loopback churn with and without the daemon.
fn overhead(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    const S: &str = "2 kernel overhead";
    let z = &ctx.sizes;
    progress(format!(
        "scenario 2: {} pairs of {} connections (server closes first), without/with the daemon, interleaved",
        z.pairs, z.churn_conns
    ));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for p in 0..z.pairs {
        let order = if p % 2 == 0 { [false, true] } else { [true, false] };
        let mut pair = [0.0; 2];
        for w in order {
            let (rate, _) = churn_run(ctx, w, &format!("churn{p}{}", if w { "d" } else { "n" }), false)?;
            progress(format!("  pair {p}: {} daemon: {rate:.0} conn/s", if w { "with" } else { "without" }));
            pair[usize::from(w)] = rate;
        }
        without.push(pair[0]);
        with.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    let foreign = foreign_daemons();
    if !foreign.is_empty() {
        rep.note(format!(
            "scenario 2: {} timewaitd process(es) not started by the bench were running during the runs (other test runs on this host); \
             their programs fire on both sides (they filter on their own namespace), so \"without daemon\" means without the bench's daemon",
            foreign.len()
        ));
    }
    let ratio = pct(&with, 50.0) / pct(&without, 50.0);
    let fmt = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    rep.row(S, "churn without daemon (conn/s per run)", fmt(&without), "", None);
    rep.row(S, "churn with daemon (conn/s per run)", fmt(&with), "", None);
    rep.row(
        S,
        "throughput ratio with/without (median of runs)",
        format!("{ratio:.3} (per pair: {})", ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")),
        ">= 0.97",
        Some(ratio >= 0.97),
    );
    // Per-program run time: a separate run, since the statistics cost time themselves.
    let guard = BpfStats::enable()?;
    let (rate, progs) = churn_run(ctx, true, "stats", true)?;
    drop(guard);
    progress(format!("  with bpf_stats_enabled: {rate:.0} conn/s"));
    if progs.is_empty() {
        bail!("bpftool shows no program held by the daemon");
    }
    for (name, ns, cnt) in progs {
        if cnt == 0 {
            rep.row(S, format!("program {name}"), "not run", "", None);
            continue;
        }
        let avg = ns as f64 / cnt as f64;
        // The iterators run once at start-up over every socket: not per event.
        let per_event = !name.starts_with("iter");
        rep.row(
            S,
            format!("program {name} (run_time_ns / run_cnt)"),
            format!("{avg:.0} ns x {}", thousands(cnt)),
            if per_event { "< 150 ns" } else { "" },
            per_event.then_some(avg < 150.0),
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ reporting

fn render_table(rep: &Report) -> String {
    let mut t = String::from("| scenario | measure | value | target | |\n| --- | --- | --- | --- | --- |\n");
    for r in &rep.rows {
        let _ = writeln!(t, "| {} | {} | {} | {} | {} |", r.scenario, r.measure, r.value, r.target, verdict(r));
    }
    t
}

fn capture(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let mem_gb = mem.split_whitespace().next().and_then(|k| k.parse::<f64>().ok()).map_or(mem.clone(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    format!(
        "- CPUs (`nproc`): {}\n- CPU model: {model}\n- kernel: {}\n- memory: {mem_gb}\n- rustc: {}",
        capture("nproc", &[]),
        capture("uname", &["-r"]),
        capture("rustc", &["--version"]),
    )
}

fn write_markdown(rep: &Report, table: &str, z: &Sizes) -> Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i + KEEP_MARKER.len()..].to_string()))
        .unwrap_or_else(|| "\n\n## Analysis\n\n(none yet)\n".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask {}` on {} (UTC), the whole run in one go; ratios are measured side by side in that run. \
         Every scenario runs in network namespaces the bench creates (`ip netns add`, `lo` up, \
         `net.ipv4.tcp_max_tw_buckets` raised, `ip_local_port_range` = `1024 65535`) with its own `timewaitd` (release build). \
         Rerun: `cargo xtask bench` (as root; `--smoke` for small sizes, which does not touch this file).\n",
        args.join(" "),
        capture("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    let _ = writeln!(md, "## Machine\n\n{}\n", machine());
    let _ = writeln!(
        md,
        "## How\n\n\
         - TIME_WAIT sockets: loopback connections from {} remotes (127.0.x.y, source address bound with `IP_BIND_ADDRESS_NO_PORT`) \
         to 127.0.0.1:8080, {} client threads; the server closes first, so the server side keeps one TIME_WAIT per connection, labelled inbound by the daemon.\n\
         - Scrapes: keep-alive HTTP/1.1 connections (as Prometheus does) that end with an RST (`SO_LINGER` 0), so scraping leaves no TIME_WAIT. \
         `/metrics`, `/api/v1/snapshot`, the `ss` pipeline and node_exporter are interleaved request by request (the order rotates); \
         the time is request to last byte of the body. The `ss` pipeline is `{}` run with `sh -c` inside the namespace (time from spawn to exit).\n\
         - Scenario 2: each run is a fresh namespace (so TIME_WAIT sockets of earlier runs do not pile up) with `--churn-conns` {} connections made as fast as \
         {} threads go, server closing first; with/without alternate in order pair by pair; the per-program figures come from one extra run with \
         `kernel.bpf_stats_enabled=1` (reset afterwards), from `bpftool prog show -j`, programs held by the daemon's pid.\n\
         - Scenario 3: {} TIME_WAIT, then a churn of {}/s over {} fixed (address, port) tuples, so that after a warm-up pass every SYN lands on the TIME_WAIT \
         the previous pass left (accepted reuse: one TIME_WAIT killed, one created per connection, population constant), for {} s, \
         while `/metrics` is scraped every second. CPU is utime+stime from `/proc/PID/stat` over the window; memory from `/proc/PID/status`.\n\
         - Scenario 4: {} TIME_WAIT created with no daemon running; then three starts, each from `spawn()` to the first `/readyz` 200 (polled every 2 ms).\n\
         - Scenario 5: Debian's `prometheus-node-exporter --collector.disable-defaults --collector.sockstat` in the scrape namespace, scraped in the same loop.\n",
        z.remotes,
        z.threads,
        SS_PIPELINE,
        z.churn_conns,
        z.threads,
        z.sockets,
        z.churn_rate,
        z.churn_rate.div_ceil(10) * 10,
        z.steady.as_secs(),
        z.sockets
    );
    let _ = writeln!(md, "## Results\n\n{table}");
    for n in &rep.notes {
        let _ = writeln!(md, "{n}\n");
    }
    let _ = write!(md, "{KEEP_MARKER}{kept}");
    std::fs::write(&path, md)?;
    Ok(())
}
