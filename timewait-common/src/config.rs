//! What the daemon hands the programs at load: kernel struct offsets from BTF and the run's settings.

/// Kernel struct offsets, read from the running kernel's BTF by the daemon and
/// handed to the programs as a read-only global (rustc emits no CO-RE
/// relocations, so nothing here may be compiled in).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `timer_list.function`
    pub timer_function: u32,
    /// `inet_timewait_sock.tw_timer`
    pub tw_timer: u32,
    /// `inet_timewait_sock.tw_substate`
    pub tw_substate: u32,
    /// `sock_common.skc_daddr`
    pub skc_daddr: u32,
    /// `sock_common.skc_rcv_saddr`
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_dport`
    pub skc_dport: u32,
    /// `sock_common.skc_num`
    pub skc_num: u32,
    /// `sock_common.skc_family`
    pub skc_family: u32,
    /// `sock_common.skc_state`
    pub skc_state: u32,
    /// `sock_common.skc_net` (a `possible_net_t`, i.e. `struct net *`)
    pub skc_net: u32,
    /// `sock_common.skc_v6_daddr`
    pub skc_v6_daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr`
    pub skc_v6_rcv_saddr: u32,
    /// `net.ns.inum`
    pub net_inum: u32,
    /// `sock.sk_protocol`
    pub sk_protocol: u32,
    /// `sk_buff.head`
    pub skb_head: u32,
    /// `sk_buff.transport_header`
    pub skb_transport_header: u32,
    /// `timer_list.entry.pprev`: non-NULL while the timer is pending.
    pub timer_pprev: u32,
    /// `sock_common.skc_hash`: the 4-tuple's ehash value.
    pub skc_hash: u32,
    /// `sk_buff.network_header`
    pub skb_network_header: u32,
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `nsproxy.net_ns`
    pub nsproxy_net_ns: u32,
    /// `sock.sk_cgrp_data`: a `struct sock_cgroup_data` whose first 8 bytes
    /// are the cgroup pointer (5.15+: `.cgroup`; before: `.val`, a pointer
    /// unless one of its low 2 bits is set).
    pub sk_cgrp_data: u32,
    /// `cgroup.kn`
    pub cgroup_kn: u32,
    /// `kernfs_node.id`
    pub kernfs_node_id: u32,
    /// `tcp_sock.segs_out`: 0 at SYN_SENT -> CLOSE when `connect()` failed
    /// before its SYN left (tracepoint path: `inet_hash_connect` found no port).
    pub tcp_segs_out: u32,
    /// `sock_common.skc_nulls_node`: where the ehash chain points into a socket.
    pub skc_nulls_node: u32,
    /// `net.ipv4.tcp_death_row`; `death_row_is_ptr` 1 when it is a pointer
    /// (5.18 to 6.0) rather than embedded.
    pub net_death_row: u32,
    pub death_row_is_ptr: u32,
    /// `inet_timewait_death_row.hashinfo`
    pub death_row_hashinfo: u32,
    /// `inet_hashinfo.ehash`, `inet_hashinfo.ehash_mask`
    pub hashinfo_ehash: u32,
    pub hashinfo_ehash_mask: u32,
    /// `sizeof(struct inet_ehash_bucket)`
    pub ehash_bucket_size: u32,
    /// `tcp_sock.snd_nxt`, `tcp_sock.snd_una`: a takeover's initial sequence
    /// number is the minisocket's `tw_snd_nxt + 65537` (`Untold`).
    pub tcp_snd_nxt: u32,
    pub tcp_snd_una: u32,
    /// `tcp_sock.bytes_acked` (`snd_una` less it is the ISN + 1 once
    /// established) and `tcp_request_sock.snt_isn`.
    pub tcp_bytes_acked: u32,
    pub reqsk_snt_isn: u32,
    /// `inet_sock.inet_sport`: a closing socket's local port once
    /// `inet_put_port` has zeroed `skc_num` (before `inet_sock_set_state`
    /// tells the CLOSE).
    pub inet_sport: u32,
    /// `socket.type` (a `short`) and `socket.sk`: `inet_bind`'s first
    /// argument, to count only TCP sockets' bind() errors.
    pub socket_type: u32,
    pub socket_sk: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`,
    /// `fdtable.fd`, `file.private_data`: the socket of a file descriptor
    /// (`sys_exit_bind`, which has only the fd its `sys_enter_bind` saw).
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
}

/// Start-up configuration of the programs (one read-only global).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    pub offsets: Offsets,
    /// Address of `tw_timer_handler` (from `/proc/kallsyms`).
    pub tw_timer_handler: u64,
    /// Network namespace to watch (inode number); 0 watches all.
    pub netns: u32,
    /// `net.ipv4.ip_local_port_range` of the daemon's namespace at start-up
    /// (0, 0 when unknown): the direction of minisockets found by the
    /// start-up snapshot whose local port has no listener.
    pub port_lo: u16,
    pub port_hi: u16,
    /// 1: keys carry the owning cgroup (`--attribute-cgroups`).
    pub cgroups: u32,
    /// 1 when the head of `sock_common` has the layout of `SockHead` in this
    /// kernel's BTF (every kernel since 3.x): the programs read it in one go.
    pub head_fast: u32,
}

/// What `nat_kfree_skb` is told at load (`--nat`): the drop reason and the
/// function that mean "conntrack refused the packet", and the offsets of
/// `struct nf_conn` (vmlinux BTF, or module BTF `/sys/kernel/btf/nf_conntrack`).
/// A separate global from `Config`: only the NAT program reads it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// `nf_hook_slow`'s code, [start, end) from `/proc/kallsyms`: a drop's
    /// `location` is a return address inside it. 0, 0: not tested.
    pub hook_slow_start: u64,
    pub hook_slow_end: u64,
    /// `SKB_DROP_REASON_NETFILTER_DROP` in this kernel's `enum skb_drop_reason`.
    pub netfilter_drop: u32,
    /// `sk_buff._nfct`
    pub skb_nfct: u32,
    /// `nf_conn.status`, `nf_conn.ct_net`
    pub ct_status: u32,
    pub ct_net: u32,
    /// Where the reply tuple (`tuplehash[IP_CT_DIR_REPLY].tuple`) is in `nf_conn`.
    pub reply_tuple: u32,
    /// In `nf_conntrack_tuple`: `src.u3`, `src.u.all`, `dst.u3`, `dst.protonum`.
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_protonum: u32,
    pub _pad: u32,
}

impl NatConfig {
    /// The value compiled into the object; the daemon overrides it when it
    /// attaches the program.
    pub const ZERO: Self = Self {
        hook_slow_start: 0,
        hook_slow_end: 0,
        netfilter_drop: 0,
        skb_nfct: 0,
        ct_status: 0,
        ct_net: 0,
        reply_tuple: 0,
        tuple_src_u3: 0,
        tuple_src_port: 0,
        tuple_dst_u3: 0,
        tuple_dst_protonum: 0,
        _pad: 0,
    };
}

/// The first 20 bytes of `struct sock_common` (`inet_timewait_sock` and
/// `sock` both begin with it), as laid out since Linux 3.x: the daemon
/// checks the BTF offsets against it (`Config::head_fast`), else the
/// programs read the fields one by one at their BTF offsets.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SockHead {
    pub daddr: [u8; 4],
    pub rcv_saddr: [u8; 4],
    pub hash: u32,
    /// Network byte order.
    pub dport: u16,
    pub num: u16,
    pub family: u16,
    pub state: u8,
    pub _flags: u8,
}

impl SockHead {
    /// (daddr, rcv_saddr, hash, dport, num, family, state) offsets of this layout.
    pub const OFFSETS: [u32; 7] = [0, 4, 8, 12, 14, 16, 18];
}

impl Offsets {
    pub const ZERO: Self = Self {
        timer_function: 0,
        tw_timer: 0,
        tw_substate: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_state: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        net_inum: 0,
        sk_protocol: 0,
        skb_head: 0,
        skb_transport_header: 0,
        timer_pprev: 0,
        skc_hash: 0,
        skb_network_header: 0,
        task_nsproxy: 0,
        nsproxy_net_ns: 0,
        sk_cgrp_data: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        tcp_segs_out: 0,
        skc_nulls_node: 0,
        net_death_row: 0,
        death_row_is_ptr: 0,
        death_row_hashinfo: 0,
        hashinfo_ehash: 0,
        hashinfo_ehash_mask: 0,
        ehash_bucket_size: 0,
        tcp_snd_nxt: 0,
        tcp_snd_una: 0,
        tcp_bytes_acked: 0,
        reqsk_snt_isn: 0,
        inet_sport: 0,
        socket_type: 0,
        socket_sk: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_private_data: 0,
    };
}

impl Config {
    /// The value compiled into the object; the daemon always overrides it.
    pub const ZERO: Self = Self {
        offsets: Offsets::ZERO,
        tw_timer_handler: 0,
        netns: 0,
        port_lo: 0,
        port_hi: 0,
        cgroups: 0,
        head_fast: 0,
    };
}
