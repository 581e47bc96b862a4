//! Socket workloads, called inside a namespace (`NetNs::run`): connections from chosen addresses and ports, and who closes first.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A TCP socket of `local`'s family bound to `local` (port 0: the kernel
/// picks one at bind time, or, with `no_port`, at connect time:
/// `IP_BIND_ADDRESS_NO_PORT`, so that the port is chosen per destination like
/// a plain `connect()` does). Errors are the kernel's own, so a caller can
/// tell EADDRINUSE apart.
pub fn bound_socket(local: SocketAddr, no_port: bool) -> io::Result<OwnedFd> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if no_port {
        set_opt(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &(1 as libc::c_int))?;
    }
    let (sa, len) = sockaddr(local);
    // SAFETY: `sa` is a sockaddr_storage holding a valid address of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `connect()` of a socket made by [`bound_socket`]; the kernel's error.
fn connect_fd(fd: OwnedFd, remote: SocketAddr) -> io::Result<TcpStream> {
    let (sa, len) = sockaddr(remote);
    // SAFETY: `fd` is open; `sa` holds a valid address of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

/// A connected TCP socket from `local` (port chosen by the kernel at connect
/// time, as a plain `connect()` does) to `remote`.
pub fn connect_from(local: Option<IpAddr>, remote: SocketAddr) -> io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(remote);
    };
    let fd = bound_socket(SocketAddr::new(local, 0), true)
        .map_err(|e| io::Error::other(format!("bind {local}: {e}")))?;
    connect_fd(fd, remote).map_err(|e| io::Error::other(format!("connect {local} -> {remote}: {e}")))
}

/// A TCP connection from exactly `local` (address and port) to `remote`.
/// The errors are the kernel's own (bind: EADDRINUSE when the port is held).
pub fn connect_from_port(local: SocketAddr, remote: SocketAddr) -> io::Result<TcpStream> {
    connect_fd(bound_socket(local, false)?, remote)
}

/// The calling thread's namespace's `ip_local_port_range` (read once per
/// workload, not per connection).
#[track_caller]
fn thread_port_range() -> (u16, u16) {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    match text.split_whitespace().filter_map(|w| w.parse().ok()).collect::<Vec<u16>>()[..] {
        [lo, hi] => (lo, hi),
        _ => panic!("{path}: {text:?}"),
    }
}

/// Where [`connect_fresh_port`] takes its next source port: one cursor per
/// network namespace (by its inode), so no two connections a namespace
/// makes through it use the same port until that namespace has gone round
/// its range. One cursor for the whole process (as before) let the tests
/// running beside one move it, modulo each namespace's own range size: a
/// test with a 100-port range came back to a port it still held within a
/// few connections, and a 4-tuple reused while in TIME_WAIT is reopened by
/// the kernel, leaving a workload of N connections N-1 TIME_WAIT.
static CLIENT_PORT: std::sync::Mutex<Option<std::collections::HashMap<u64, usize>>> = std::sync::Mutex::new(None);

/// The next cursor value of the calling thread's namespace.
fn next_client_port() -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).unwrap_or(0);
    let mut cursors = CLIENT_PORT.lock().unwrap_or_else(|e| e.into_inner());
    let cursor = cursors.get_or_insert_with(Default::default).entry(ns).or_insert(0);
    let n = *cursor;
    *cursor += 1;
    n
}

/// A connection from `local` to `remote` on a source port of the calling
/// namespace's ephemeral range (`range`) that no earlier connection through
/// here took (ports held by another socket are skipped). The kernel's own
/// choice cannot promise that: its offset per (source, destination) lives in
/// one table for all namespaces (`table_perturb`), so connections of tests
/// running beside this one move it, and it comes back to a port whose
/// 4-tuple the server still holds in TIME_WAIT; that SYN then reopens the
/// TIME_WAIT (the kernel kills it to accept the connection) and a workload
/// of N connections leaves N-1 (seen: 149 of 150 on 6.1). Call inside the
/// namespace.
pub fn connect_fresh_port(local: IpAddr, remote: SocketAddr, (lo, hi): (u16, u16)) -> io::Result<TcpStream> {
    let size = usize::from(hi.saturating_sub(lo)) + 1;
    for _ in 0..size {
        let port = lo + (next_client_port() % size) as u16;
        let from = SocketAddr::new(local, port);
        match connect_from_port(from, remote) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(e) => return Err(io::Error::other(format!("{from} -> {remote}: {e}"))),
            Ok(s) => return Ok(s),
        }
    }
    Err(io::Error::other(format!("{local} -> {remote}: every port of {lo}-{hi} is held")))
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Where a client from `from` reaches `listener`: a wildcard listener is
/// reached on loopback, an IPv6 wildcard one over IPv4 too (bindv6only=0).
fn target(listener: &TcpListener, from: Option<IpAddr>) -> SocketAddr {
    let mut addr = listener.local_addr().expect("listener address");
    if addr.ip().is_unspecified() {
        let v4_client = match from {
            Some(ip) => ip.is_ipv4(),
            None => addr.is_ipv4(),
        };
        addr.set_ip(if v4_client {
            v4(127, 0, 0, 1)
        } else {
            V6_LOOPBACK
        });
    }
    addr
}

/// The server closes first: for each client connection the server accepts
/// and closes; the client (from the given address) waits for EOF, then
/// closes. Each connection leaves one TIME_WAIT on the SERVER side (local
/// port = the listening port, peer = the client address), each with its own
/// client port ([`connect_fresh_port`]), so N connections leave exactly N.
/// Sockets are closed as we go, so thousands of connections need only a few
/// descriptors.
#[track_caller]
pub fn server_closes_first(listener: &TcpListener, clients: &[(IpAddr, usize)]) {
    let range = thread_port_range();
    for &(from, n) in clients {
        let to = target(listener, Some(from));
        for i in 0..n {
            let client = connect_fresh_port(from, to, range)
                .unwrap_or_else(|e| panic!("connection {i} of {n} from {from}: {e}"));
            let (server, _) = listener.accept().expect("accept");
            drop(server);
            wait_eof(&client);
            drop(client);
        }
    }
}

/// Like [`server_closes_first`] but the clients never close: returns them
/// open. Their servers' sockets sit in FIN_WAIT2 (as minisockets) until the
/// caller drops the clients.
#[track_caller]
pub fn server_closes_first_clients_stay(
    listener: &TcpListener,
    clients: &[(IpAddr, usize)],
) -> Vec<TcpStream> {
    let mut open = Vec::new();
    let range = thread_port_range();
    for &(from, n) in clients {
        let to = target(listener, Some(from));
        for i in 0..n {
            let client = connect_fresh_port(from, to, range)
                .unwrap_or_else(|e| panic!("connection {i} of {n} from {from}: {e}"));
            let (server, _) = listener.accept().expect("accept");
            drop(server);
            wait_eof(&client);
            open.push(client);
        }
    }
    open
}

/// The client closes first: the server reads EOF and closes. Each connection
/// leaves one TIME_WAIT on the CLIENT side (local ephemeral port, peer = the
/// listener's address and port).
#[track_caller]
pub fn client_closes_first(listener: &TcpListener, from: Option<IpAddr>, n: usize) {
    let to = target(listener, from);
    for i in 0..n {
        let client =
            connect_from(from, to).unwrap_or_else(|e| panic!("connection {i} of {n} to {to}: {e}"));
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        wait_eof(&server);
        drop(server);
    }
}

/// Reads until EOF (10 s at most); panics on data or error.
#[track_caller]
pub fn wait_eof(s: &TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    let mut buf = [0u8; 64];
    match (&*s).read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, read {n} bytes"),
        Err(e) => panic!("expected EOF: {e}"),
    }
}

/// Closes with an RST (`SO_LINGER {on, 0}`): neither end enters TIME_WAIT.
pub fn abortive_close(stream: TcpStream) -> io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_opt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &lg)?;
    drop(stream);
    Ok(())
}

/// `setsockopt(fd, level, name, value)` with the value's exact size.
pub fn set_opt<T>(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor of the caller's; `value` points to a
    // live T whose exact size is passed.
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
