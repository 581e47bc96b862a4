//! What the programs are told of the running kernel: struct offsets from its BTF, and the address of `tw_timer_handler`.

use std::fs;

use btf_rs::{Btf, Type};
use thiserror::Error;
use timewait_common::Offsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot read kernel BTF at {VMLINUX_BTF}: {0} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Btf(String),
    #[error("kernel BTF has no {0}: this kernel's layout is not supported")]
    Field(String),
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("tw_timer_handler not found in /proc/kallsyms (addresses hidden? run as root or set kernel.kptr_restrict=0)")]
    TwTimerHandler,
}

/// Finds `path` ("a.b.c") inside struct `name`, through anonymous unions and
/// structs, and returns its byte offset.
pub(super) fn offset_of(btf: &Btf, name: &str, path: &str) -> Result<u32, KernelError> {
    let missing = || KernelError::Field(format!("{name}.{path}"));
    let (bits, _) = member(btf, name, path).ok_or_else(missing)?;
    if !bits.is_multiple_of(8) {
        return Err(missing());
    }
    Ok(bits / 8)
}

/// `path` inside struct `name`: its bit offset and its type (typedefs and
/// qualifiers stripped).
fn member(btf: &Btf, name: &str, path: &str) -> Option<(u32, Type)> {
    let mut ty = btf.resolve_types_by_name(name).ok()?.into_iter().find(|t| matches!(t, Type::Struct(_)))?;
    let mut bits = 0u32;
    for field in path.split('.') {
        let (off, next) = find_member(btf, &ty, field)?;
        bits += off;
        ty = next;
    }
    Some((bits, ty))
}

/// Member `field` of struct/union `ty`: (bit offset, its type with typedefs
/// and qualifiers stripped).
fn find_member(btf: &Btf, ty: &Type, field: &str) -> Option<(u32, Type)> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let mty = strip(btf, btf.resolve_chained_type(m).ok()?)?;
        if name == field {
            return Some((m.bit_offset(), mty));
        }
        if name.is_empty()
            && let Some((off, t)) = find_member(btf, &mty, field)
        {
            return Some((m.bit_offset() + off, t));
        }
    }
    None
}

fn strip(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(t).ok()?,
            _ => return Some(ty),
        };
    }
    None
}

/// Parameter count of kernel function `name` in BTF (None when BTF has no
/// such function, e.g. it was inlined).
pub fn param_count(btf: &Btf, name: &str) -> Option<usize> {
    let types = btf.resolve_types_by_name(name).ok()?;
    let func = types.into_iter().find_map(|t| match t {
        Type::Func(f) => Some(f),
        _ => None,
    })?;
    match btf.resolve_chained_type(&func).ok()? {
        Type::FuncProto(p) => Some(p.parameters.len()),
        _ => None,
    }
}

pub fn load_btf() -> Result<Btf, KernelError> {
    Btf::from_file(VMLINUX_BTF).map_err(|e| KernelError::Btf(e.to_string()))
}

/// The offsets the eBPF programs need, from the running kernel's BTF.
pub fn offsets(btf: &Btf) -> Result<Offsets, KernelError> {
    let sc = |f: &str| offset_of(btf, "sock_common", f);
    let entry = offset_of(btf, "timer_list", "entry")?;
    let pprev = offset_of(btf, "hlist_node", "pprev")?;
    // `netns_ipv4.tcp_death_row`: embedded, except from 5.18 to 6.0 (a pointer).
    let net_death_row = offset_of(btf, "net", "ipv4.tcp_death_row")?;
    let death_row_is_ptr = member(btf, "net", "ipv4.tcp_death_row").is_some_and(|(_, t)| matches!(t, Type::Ptr(_)));
    Ok(Offsets {
        timer_function: offset_of(btf, "timer_list", "function")?,
        tw_timer: offset_of(btf, "inet_timewait_sock", "tw_timer")?,
        tw_substate: offset_of(btf, "inet_timewait_sock", "tw_substate")?,
        skc_daddr: sc("skc_daddr")?,
        skc_rcv_saddr: sc("skc_rcv_saddr")?,
        skc_dport: sc("skc_dport")?,
        skc_num: sc("skc_num")?,
        skc_family: sc("skc_family")?,
        skc_state: sc("skc_state")?,
        skc_net: sc("skc_net")?,
        skc_v6_daddr: sc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sc("skc_v6_rcv_saddr")?,
        net_inum: offset_of(btf, "net", "ns.inum")?,
        sk_protocol: offset_of(btf, "sock", "sk_protocol")?,
        skb_head: offset_of(btf, "sk_buff", "head")?,
        skb_transport_header: offset_of(btf, "sk_buff", "transport_header")?,
        timer_pprev: entry + pprev,
        skc_hash: sc("skc_hash")?,
        skb_network_header: offset_of(btf, "sk_buff", "network_header")?,
        task_nsproxy: offset_of(btf, "task_struct", "nsproxy")?,
        nsproxy_net_ns: offset_of(btf, "nsproxy", "net_ns")?,
        // Only with --attribute-cgroups (`cgroup_offsets`).
        sk_cgrp_data: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        tcp_segs_out: offset_of(btf, "tcp_sock", "segs_out")?,
        skc_nulls_node: sc("skc_nulls_node")?,
        net_death_row,
        death_row_is_ptr: u32::from(death_row_is_ptr),
        death_row_hashinfo: offset_of(btf, "inet_timewait_death_row", "hashinfo")?,
        hashinfo_ehash: offset_of(btf, "inet_hashinfo", "ehash")?,
        hashinfo_ehash_mask: offset_of(btf, "inet_hashinfo", "ehash_mask")?,
        ehash_bucket_size: struct_size(btf, "inet_ehash_bucket")?,
        tcp_snd_nxt: offset_of(btf, "tcp_sock", "snd_nxt")?,
        tcp_snd_una: offset_of(btf, "tcp_sock", "snd_una")?,
        tcp_bytes_acked: offset_of(btf, "tcp_sock", "bytes_acked")?,
        reqsk_snt_isn: offset_of(btf, "tcp_request_sock", "snt_isn")?,
        inet_sport: offset_of(btf, "inet_sock", "inet_sport")?,
        socket_type: offset_of(btf, "socket", "type")?,
        socket_sk: offset_of(btf, "socket", "sk")?,
        task_files: offset_of(btf, "task_struct", "files")?,
        files_fdt: offset_of(btf, "files_struct", "fdt")?,
        fdtable_max_fds: offset_of(btf, "fdtable", "max_fds")?,
        fdtable_fd: offset_of(btf, "fdtable", "fd")?,
        file_private_data: offset_of(btf, "file", "private_data")?,
    })
}

/// Byte size of struct `name`.
pub(super) fn struct_size(btf: &Btf, name: &str) -> Result<u32, KernelError> {
    let types = btf.resolve_types_by_name(name).map_err(|_| KernelError::Field(name.to_string()))?;
    types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s.size() as u32),
            _ => None,
        })
        .ok_or_else(|| KernelError::Field(name.to_string()))
}

/// `sock.sk_cgrp_data`, `cgroup.kn`, `kernfs_node.id`: where a socket's
/// owning cgroup and its id are (kernels without CONFIG_SOCK_CGROUP_DATA
/// have no such field: attribution is then refused at start).
pub fn cgroup_offsets(btf: &Btf) -> Result<(u32, u32, u32), KernelError> {
    Ok((
        offset_of(btf, "sock", "sk_cgrp_data")?,
        offset_of(btf, "cgroup", "kn")?,
        offset_of(btf, "kernfs_node", "id")?,
    ))
}

/// Timer functions the programs recognise, from `/proc/kallsyms`.
#[derive(Debug, Clone, Copy)]
pub struct TimerFunctions {
    /// Every minisocket's timer.
    pub tw_timer_handler: u64,
}

pub fn timer_functions() -> Result<TimerFunctions, KernelError> {
    let path = "/proc/kallsyms";
    let text = fs::read_to_string(path).map_err(|err| KernelError::Read { path: path.into(), err })?;
    let mut tw = 0;
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
        if name == "tw_timer_handler" {
            tw = u64::from_str_radix(addr, 16).unwrap_or(0);
        }
    }
    if tw == 0 {
        return Err(KernelError::TwTimerHandler);
    }
    Ok(TimerFunctions { tw_timer_handler: tw })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs only a readable BTF; checks offsets against the layout this
    /// machine's kernel documents (6.x: tw_timer after the common header).
    #[test]
    fn offsets_from_running_kernel() {
        let Ok(btf) = load_btf() else {
            eprintln!("SKIPPED offsets_from_running_kernel: no {VMLINUX_BTF}");
            return;
        };
        let o = offsets(&btf).expect("offsets");
        assert_eq!(o.skc_daddr, 0, "skc_daddr opens sock_common");
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.tw_timer > o.tw_substate, "{o:?}");
        assert_eq!(o.timer_pprev, 8, "hlist_node.pprev");
        assert!(o.skc_v6_daddr > o.skc_net, "{o:?}");
        assert!(o.tcp_segs_out > o.sk_protocol, "tcp_sock.segs_out after its struct sock: {o:?}");
        assert!(o.tcp_snd_nxt > o.sk_protocol && o.tcp_snd_una > o.sk_protocol, "tcp_sock's sequence numbers after its struct sock: {o:?}");
        assert!(offset_of(&btf, "sock_common", "no_such_field").is_err());
        let (sk_cgrp, kn, id) = cgroup_offsets(&btf).expect("cgroup offsets");
        assert!(sk_cgrp > 0, "sock.sk_cgrp_data after sock_common");
        assert!(kn > 0, "cgroup.kn after its self css");
        assert!(id > 0, "kernfs_node.id after count/active/parent/name");
    }
}
