//! Issue-3 sockets: fixed-port clients, a connection's send sequence and timestamp, hand-built TCP segments.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::support::netns::NetNs;
use crate::support::syn::readings::wait_only_time_wait;

/// `struct tcp_repair_opt`'s queue id for the send queue (include/uapi/linux/tcp.h);
/// the libc crate does not export it.
const TCP_SEND_QUEUE: libc::c_int = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::other(format!(
            "{what}: {}",
            io::Error::last_os_error()
        )))
    } else {
        Ok(())
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `fd` is open; the value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const val).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// A TCP client bound to exactly `local` (SO_REUSEADDR), connected to `remote`.
pub fn fixed_port_client(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket")?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    let sa = sockaddr_in(local);
    // SAFETY: `sa` is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    check(rc, &format!("bind {local}"))?;
    let sa = sockaddr_in(remote);
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    check(rc, &format!("connect {local} -> {remote}"))?;
    Ok(TcpStream::from(fd))
}

pub use crate::support::sockets::wait_eof;

/// The connection's next send sequence number (`tp->write_seq`), read through
/// TCP_REPAIR: repair mode on, select the send queue, read TCP_QUEUE_SEQ,
/// repair mode off again (the connection carries on normally). Needs
/// CAP_NET_ADMIN.
#[track_caller]
pub fn send_seq(s: &TcpStream) -> u32 {
    let fd = s.as_raw_fd();
    let set = |opt: libc::c_int, val: libc::c_int, what: &str| {
        // SAFETY: `fd` is open (borrowed from `s`); the value is a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const val).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            panic!("setsockopt {what}: {}", io::Error::last_os_error());
        }
    };
    set(libc::TCP_REPAIR, 1, "TCP_REPAIR=1");
    set(
        libc::TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE=TCP_SEND_QUEUE",
    );
    let mut seq: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: `fd` is open; `seq`/`len` are live and `len` is seq's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&raw mut seq).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        panic!("getsockopt TCP_QUEUE_SEQ: {}", io::Error::last_os_error());
    }
    // TCP_REPAIR_OFF_NO_WP (-1): leave repair mode without the window probe
    // that TCP_REPAIR_OFF (0) sends, so the connection sees no extra segment.
    set(libc::TCP_REPAIR, -1, "TCP_REPAIR=TCP_REPAIR_OFF_NO_WP");
    seq
}

/// The timestamp value the connection puts in its next segment
/// (`TCP_TIMESTAMP`: the TCP clock plus the connection's offset).
#[track_caller]
pub fn tsval(s: &TcpStream) -> u32 {
    let mut v: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: the fd is open (borrowed from `s`); `v`/`len` are live and `len` is v's size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        panic!("getsockopt TCP_TIMESTAMP: {}", io::Error::last_os_error());
    }
    v
}

/// One hand-built TCP segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// `(tsval, tsecr)`: adds the timestamp option (NOP, NOP, TS).
    pub timestamp: Option<(u32, u32)>,
}

impl Segment {
    /// The TCP header with a correct checksum (pseudo-header: src, dst,
    /// protocol 6, TCP length).
    pub fn bytes(&self) -> Vec<u8> {
        let opt_len = if self.timestamp.is_some() { 12 } else { 0 };
        let len = 20 + opt_len;
        let mut h = vec![0u8; len];
        h[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        h[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        h[4..8].copy_from_slice(&self.seq.to_be_bytes());
        h[8..12].copy_from_slice(&self.ack.to_be_bytes());
        h[12] = ((len / 4) as u8) << 4;
        h[13] = self.flags;
        h[14..16].copy_from_slice(&65535u16.to_be_bytes());
        if let Some((val, ecr)) = self.timestamp {
            h[20] = 1; // NOP
            h[21] = 1; // NOP
            h[22] = 8; // kind: timestamp
            h[23] = 10; // length
            h[24..28].copy_from_slice(&val.to_be_bytes());
            h[28..32].copy_from_slice(&ecr.to_be_bytes());
        }
        let mut pseudo = Vec::with_capacity(12 + len);
        pseudo.extend_from_slice(&self.src.ip().octets());
        pseudo.extend_from_slice(&self.dst.ip().octets());
        pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        pseudo.extend_from_slice(&h);
        let sum = internet_checksum(&pseudo);
        h[16..18].copy_from_slice(&sum.to_be_bytes());
        h
    }

    /// Sends it from a raw socket (`SOCK_RAW`, `IPPROTO_TCP`; the kernel
    /// writes the IP header) bound to the source address, so the kernel's IP
    /// source is the one the checksum covers. Call inside the namespace.
    #[track_caller]
    pub fn send(&self) {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        if fd < 0 {
            panic!(
                "socket(SOCK_RAW, IPPROTO_TCP): {}",
                io::Error::last_os_error()
            );
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let src = sockaddr_in(SocketAddrV4::new(*self.src.ip(), 0));
        // SAFETY: `src` is a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const src).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            panic!(
                "bind raw socket to {}: {}",
                self.src.ip(),
                io::Error::last_os_error()
            );
        }
        let bytes = self.bytes();
        let dst = sockaddr_in(SocketAddrV4::new(*self.dst.ip(), 0));
        // SAFETY: `bytes` is live for the call and its length is passed;
        // `dst` is a valid sockaddr_in of the size passed.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const dst).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n != bytes.len() as isize {
            panic!("sendto {self:?}: {n}: {}", io::Error::last_os_error());
        }
    }
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn sa4(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

/// What is left of one connection whose server closed first.
#[derive(Debug, Clone, Copy)]
pub struct ServerTimeWait {
    /// The client's address and port (the minisocket's peer).
    pub client: SocketAddrV4,
    /// The listener's address and port (the minisocket's local end).
    pub server: SocketAddrV4,
    /// The minisocket's `tw_rcv_nxt`: the client's send sequence + 1 for its FIN.
    pub rcv_nxt: u32,
    /// The client's timestamp clock just before it closed (its FIN carried
    /// this or later, so the minisocket's `ts_recent` is at least this).
    pub tsval: u32,
}

/// One connection from exactly `client` to `server` (a listener of this
/// namespace, passed as `listener`), the server closing first: the server
/// accepts and closes, the client reads EOF and closes. Before closing, the
/// client's send sequence and timestamp are read. Returns once `ss` shows the
/// server's minisocket in TIME_WAIT and nothing else on the 4-tuple.
#[track_caller]
pub fn server_closes_first_once(
    ns: &NetNs,
    listener: &std::net::TcpListener,
    client: SocketAddrV4,
) -> ServerTimeWait {
    let server = match listener.local_addr().expect("listener address") {
        SocketAddr::V4(a) => a,
        other => panic!("IPv4 listener expected, got {other}"),
    };
    let (seq, ts) = ns.run(|| {
        let c = fixed_port_client(client, server)
            .unwrap_or_else(|e| panic!("connect {client} -> {server}: {e}"));
        let (srv, _) = listener.accept().expect("accept");
        let seq = send_seq(&c);
        let ts = tsval(&c);
        drop(srv);
        wait_eof(&c);
        drop(c);
        (seq, ts)
    });
    wait_only_time_wait(ns, server, client);
    ServerTimeWait {
        client,
        server,
        rcv_nxt: seq.wrapping_add(1),
        tsval: ts,
    }
}
