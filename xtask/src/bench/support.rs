//! What the scenarios share: network namespaces, child processes, a
//! keep-alive HTTP client, the loopback socket generator, statistics and
//! the BPF programs' own run statistics.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------- namespaces

/// A network namespace, deleted on drop.
pub(super) struct Netns {
    pub(super) name: String,
    pub(super) file: File,
}

impl Netns {
    pub(super) fn new(tag: &str) -> Result<Self> {
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
    pub(super) fn roomy(tag: &str, sockets: usize) -> Result<Self> {
        let ns = Self::new(tag)?;
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", &(sockets * 2).max(262_144).to_string())?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        Ok(ns)
    }

    pub(super) fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        quiet(self.command("sysctl").args(["-qw", &format!("{key}={value}")]))
    }

    /// A command that runs inside the namespace (setns between fork and exec).
    pub(super) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
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
    pub(super) fn enter(&self) -> std::io::Result<()> {
        // SAFETY: plain syscall on a valid fd; affects this thread only.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    pub(super) fn within<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> std::io::Result<R> {
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
    pub(super) fn tw_count(&self) -> Result<u64> {
        let text = self.within(|| std::fs::read_to_string("/proc/thread-self/net/sockstat"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("TCP: "))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.windows(2).find(|w| w[0] == "tw").and_then(|w| w[1].parse().ok())
            })
            .context("no tw in /proc/net/sockstat")
    }

    pub(super) fn connect(&self, addr: SocketAddrV4) -> std::io::Result<TcpStream> {
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
pub(super) fn remove_stale_namespaces() {
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

pub(super) fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// timewaitd processes not started by this bench.
pub(super) fn foreign_daemons() -> Vec<u32> {
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
pub(super) struct Proc {
    pub(super) what: String,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

impl Proc {
    pub(super) fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let f = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(Proc { what: what.to_string(), child, log })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("{} exited ({st}); last lines of {}:\n{}", self.what, self.log.display(), tail.join("\n"));
        }
        Ok(())
    }

    pub(super) fn stop(&mut self) {
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
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
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
pub(super) fn rss_kb(pid: u32) -> Result<(u64, u64)> {
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
pub(super) struct Http {
    pub(super) r: BufReader<TcpStream>,
    pub(super) closed: bool,
}

impl Http {
    pub(super) fn connect(ns: &Netns, addr: SocketAddrV4) -> std::io::Result<Self> {
        let s = ns.connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, 0)?;
        Ok(Http { r: BufReader::with_capacity(1 << 16, s), closed: false })
    }

    pub(super) fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
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
pub(super) struct Scraper<'a> {
    pub(super) ns: &'a Netns,
    pub(super) addr: SocketAddrV4,
    pub(super) http: Option<Http>,
}

impl<'a> Scraper<'a> {
    pub(super) fn new(ns: &'a Netns, addr: SocketAddrV4) -> Self {
        Scraper { ns, addr, http: None }
    }

    /// (milliseconds, body) of one successful GET.
    pub(super) fn get(&mut self, path: &str) -> Result<(f64, Vec<u8>)> {
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
pub(super) fn metric_sum(body: &[u8], name: &str, filter: &str) -> f64 {
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts timewaitd in `ns` and waits for /readyz 200; returns it and the time that took.
pub(super) fn start_daemon(ctx: &Ctx, ns: &Netns, tag: &str) -> Result<(Proc, Duration)> {
    start_daemon_with(ctx, ns, tag, &[])
}

pub(super) fn start_daemon_with(ctx: &Ctx, ns: &Netns, tag: &str, extra: &[&str]) -> Result<(Proc, Duration)> {
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

pub(super) fn set_int(fd: i32, level: i32, opt: i32, v: i32) -> std::io::Result<()> {
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

pub(super) fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// A client socket bound to `from` (port 0: chosen at connect time, thanks to
/// IP_BIND_ADDRESS_NO_PORT) and connected to `to`.
pub(super) fn connect_from(from: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<TcpStream> {
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
pub(super) fn remote(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, base.wrapping_add((i / 250) as u8), (i % 250) as u8 + 1)
}

/// Makes loopback connections where the server closes first, so each one
/// leaves a TIME_WAIT minisocket on the server side, keyed by the client's
/// address and port (the client, closing second, keeps nothing).
pub(super) struct Generator<'a> {
    pub(super) ns: &'a Netns,
    pub(super) listener: TcpListener,
    pub(super) server: SocketAddrV4,
}

#[derive(Default, Debug)]
pub(super) struct GenStats {
    pub(super) made: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) elapsed: Duration,
}

impl GenStats {
    pub(super) fn rate(&self) -> f64 {
        self.made as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Which (source address, source port) the g-th connection uses.
#[derive(Clone)]
pub(super) enum Sources {
    /// Remote g % n, ephemeral port.
    Ephemeral(Vec<Ipv4Addr>),
    /// A fixed set of (address, port) tuples, round-robin: after the first
    /// pass every SYN lands on the TIME_WAIT the previous pass left (accepted
    /// reuse), so the population stays constant while the churn goes on.
    Fixed(Vec<SocketAddrV4>),
}

impl Sources {
    pub(super) fn get(&self, g: usize) -> SocketAddrV4 {
        match self {
            Sources::Ephemeral(v) => SocketAddrV4::new(v[g % v.len()], 0),
            Sources::Fixed(v) => v[g % v.len()],
        }
    }
}

impl<'a> Generator<'a> {
    pub(super) fn new(ns: &'a Netns, port: u16) -> Result<Self> {
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
    pub(super) fn run(&self, sources: &Sources, count: usize, threads: usize, rate: Option<f64>, until: Option<Instant>) -> Result<GenStats> {
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
    pub(super) fn one(&self, from: SocketAddrV4) -> std::io::Result<()> {
        let mut c = connect_from(from, self.server)?;
        let (s, _) = self.listener.accept()?;
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 16];
        while c.read(&mut b)? != 0 {}
        Ok(())
    }
}

pub(super) fn remotes(base: u8, n: usize) -> Vec<Ipv4Addr> {
    (0..n).map(|i| remote(base, i)).collect()
}

// ----------------------------------------------------------------- statistics

pub(super) fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[k - 1]
}

pub(super) fn ms(v: f64) -> String {
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

pub(super) fn p50_p99(v: &[f64]) -> String {
    format!("p50 {} / p99 {}", ms(pct(v, 50.0)), ms(pct(v, 99.0)))
}

pub(super) fn thousands(n: u64) -> String {
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

/// (program name, run_time_ns, run_cnt).
pub(super) type ProgStats = Vec<(String, u64, u64)>;

/// Restores kernel.bpf_stats_enabled on drop.
pub(super) struct BpfStats(String);

impl BpfStats {
    pub(super) fn enable() -> Result<Self> {
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
pub(super) fn prog_ids(pid: u32) -> Result<Vec<u64>> {
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
pub(super) fn prog_stats(pid: u32) -> Result<ProgStats> {
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

