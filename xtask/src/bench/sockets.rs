//! The loopback socket generator: connections where the server closes first, each leaving a TIME_WAIT.

#[allow(clippy::wildcard_imports)]
use super::*;

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
