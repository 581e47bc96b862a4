//! A keep-alive HTTP client that leaves no TIME_WAIT, a timing scraper, and the daemon started and waited for.

#[allow(clippy::wildcard_imports)]
use super::*;

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
