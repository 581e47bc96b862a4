//! Per-destination NAT allocation failures (`--nat`): what `nat_kfree_skb` is told at load, attaching it, reading its counts.
//!
//! The program (`timewait-ebpf/src/tracepoint/nat_drop.rs`) needs the value
//! of `SKB_DROP_REASON_NETFILTER_DROP` (the enum is renumbered between
//! kernels), `nf_hook_slow`'s code range (`/proc/kallsyms`) and the offsets
//! of `struct nf_conn`: in vmlinux BTF where conntrack is built in, in the
//! module's BTF (`/sys/kernel/btf/nf_conntrack`, 5.11+, only while the module
//! is loaded) on Debian's kernels. Whether the program runs is decided by
//! loading it: 5.10's `kfree_skb` has no `reason` and the verifier refuses it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
};
use btf_rs::Type;
use timewait_common::{AF_INET, AF_INET6, NatConfig, NatDropKey};

use super::{
    offsets::{offset_of, struct_size},
    paths::{self, Path, SignalPath},
};
use crate::nat::{Destination, Protocol};

/// Module BTF of conntrack on kernels where it is a module.
pub const CONNTRACK_BTF: &str = "/sys/kernel/btf/nf_conntrack";
pub const PROGRAM: &str = "nat_kfree_skb";

/// The program's configuration from the running kernel; `Err` says in one
/// line why the kernel cannot serve it. `hook_slow` false: `nf_hook_slow`
/// is not in kallsyms, and drops are not told by where they were freed.
pub fn nat_config(vmlinux: &btf_rs::Btf) -> Result<(NatConfig, bool), String> {
    let netfilter_drop = enum_value(vmlinux, "skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP").ok_or(
        "no SKB_DROP_REASON_NETFILTER_DROP in BTF (kfree_skb has a drop reason from 5.17, netfilter's from 5.18)",
    )?;
    let skb_nfct = offset_of(vmlinux, "sk_buff", "_nfct").map_err(|e| e.to_string())?;
    let module;
    let btf = if offset_of(vmlinux, "nf_conn", "status").is_ok() {
        vmlinux
    } else {
        module = btf_rs::Btf::from_split_file(CONNTRACK_BTF, vmlinux).map_err(|e| {
            format!("struct nf_conn is not in vmlinux BTF and {CONNTRACK_BTF} cannot be read ({e}): conntrack not loaded, or no module BTF (before 5.11)")
        })?;
        &module
    };
    let off = |s: &str, f: &str| offset_of(btf, s, f).map_err(|e| e.to_string());
    let hash_size = struct_size(btf, "nf_conntrack_tuple_hash").map_err(|e| e.to_string())?;
    let (start, end) = function_range("nf_hook_slow").unwrap_or((0, 0));
    let config = NatConfig {
        hook_slow_start: start,
        hook_slow_end: end,
        netfilter_drop,
        skb_nfct,
        ct_status: off("nf_conn", "status")?,
        ct_net: off("nf_conn", "ct_net")?,
        // tuplehash[IP_CT_DIR_REPLY].tuple
        reply_tuple: off("nf_conn", "tuplehash")? + hash_size + off("nf_conntrack_tuple_hash", "tuple")?,
        tuple_src_u3: off("nf_conntrack_tuple", "src.u3")?,
        tuple_src_port: off("nf_conntrack_tuple", "src.u")?,
        tuple_dst_u3: off("nf_conntrack_tuple", "dst.u3")?,
        tuple_dst_protonum: off("nf_conntrack_tuple", "dst.protonum")?,
        _pad: 0,
    };
    Ok((config, start != 0))
}

/// Value of `member` of enum `name` in BTF.
fn enum_value(btf: &btf_rs::Btf, name: &str, member: &str) -> Option<u32> {
    for t in btf.resolve_types_by_name(name).ok()? {
        match t {
            Type::Enum(e) => {
                if let Some(m) = e.members.iter().find(|m| btf.resolve_name(*m).is_ok_and(|n| n == member)) {
                    return Some(m.val());
                }
            }
            Type::Enum64(e) => {
                if let Some(m) = e.members.iter().find(|m| btf.resolve_name(*m).is_ok_and(|n| n == member)) {
                    return u32::try_from(m.val()).ok();
                }
            }
            _ => {}
        }
    }
    None
}

/// [start, end) of kernel function `name` from `/proc/kallsyms`: its
/// address and the next higher symbol's (None when hidden or absent).
pub fn function_range(name: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    let addrs = text.lines().filter_map(|l| {
        let mut it = l.split_whitespace();
        let addr = u64::from_str_radix(it.next()?, 16).ok()?;
        let _kind = it.next()?;
        Some((addr, it.next()?))
    });
    let start = addrs.clone().find(|(_, n)| *n == name).map(|(a, _)| a).filter(|a| *a != 0)?;
    let end = addrs.map(|(a, _)| a).filter(|a| *a > start).min()?;
    Some((start, end))
}

/// The program's maps, once it is attached.
pub struct NatDrops {
    pub drops: HashMap<MapData, NatDropKey, u64>,
    pub unattributed: Array<MapData, u64>,
}

/// Attaches `nat_kfree_skb` (its globals were set at load, `config`: None
/// when the kernel cannot give them, with why). The `nat_failures` row:
/// `tracepoint` when attached, else `unavailable` with the refusal.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf, config: Result<bool, String>) -> (SignalPath, Option<NatDrops>) {
    let (sp, maps) = try_attach(ebpf, btf, config);
    if sp.path == Path::Unavailable {
        tracing::warn!(refused = %sp.refused.join("; "), "NAT allocation failures per destination unavailable: not exported");
    }
    (sp, maps)
}

fn try_attach(ebpf: &mut Ebpf, btf: &Btf, config: Result<bool, String>) -> (SignalPath, Option<NatDrops>) {
    let mut sp = SignalPath { signal: paths::NAT_FAILURES, path: Path::Unavailable, hooks: Vec::new(), refused: Vec::new() };
    let hook_slow = match config {
        Ok(h) => h,
        Err(e) => {
            sp.refused.push(e);
            return (sp, None);
        }
    };
    if let Err(e) = paths::tp_btf(ebpf, btf, PROGRAM, "kfree_skb") {
        sp.refused.push(format!("tp_btf/kfree_skb: {e}"));
        return (sp, None);
    }
    let maps = (|| -> Result<NatDrops, String> {
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).ok_or_else(|| format!("map {name} not in object"));
        let drops = HashMap::try_from(take(ebpf, "NAT_DROPS")?).map_err(|e| super::error_chain(&e))?;
        let unattributed = Array::try_from(take(ebpf, "NAT_UNATTRIBUTED")?).map_err(|e| super::error_chain(&e))?;
        Ok(NatDrops { drops, unattributed })
    })();
    match maps {
        Ok(m) => {
            sp.path = Path::Tracepoint;
            sp.hooks.push("tp_btf/kfree_skb".to_string());
            if !hook_slow {
                sp.refused.push(
                    "nf_hook_slow not in /proc/kallsyms: drops are not told by where they were freed (a rule's DROP after NAT may count)"
                        .to_string(),
                );
            }
            (sp, Some(m))
        }
        Err(e) => {
            sp.refused.push(e);
            (sp, None)
        }
    }
}

impl NatDrops {
    /// Every destination's count and the drops that fit no key.
    pub fn read(&self, errors: &std::sync::atomic::AtomicU64) -> (Vec<(NatDropKey, u64)>, u64) {
        let drops = super::maps::read_all(&self.drops, errors);
        let unattributed = self.unattributed.get(&0, 0).unwrap_or_else(|_| {
            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            0
        });
        (drops, unattributed)
    }
}

/// A key's namespace and destination; None for a protocol that holds no
/// ports (or an unknown family): the caller counts it as unattributed.
pub fn destination(k: &NatDropKey) -> Option<(u32, Destination)> {
    let addr = |a: &[u8; 16]| -> Option<IpAddr> {
        match k.family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*a))),
            _ => None,
        }
    };
    Some((
        k.netns,
        Destination {
            nat_address: addr(&k.nat_address)?,
            remote: addr(&k.remote)?,
            port: k.port,
            protocol: Protocol::from_ip(k.l4proto)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_destinations() {
        let mut k = NatDropKey { netns: 7, family: AF_INET, l4proto: 17, port: 5000, ..NatDropKey::default() };
        k.nat_address[..4].copy_from_slice(&[10, 97, 3, 1]);
        k.remote[..4].copy_from_slice(&[10, 97, 3, 2]);
        let (ns, d) = destination(&k).expect("udp over IPv4");
        assert_eq!((ns, d.nat_address.to_string(), d.remote.to_string(), d.port, d.protocol), (7, "10.97.3.1".into(), "10.97.3.2".into(), 5000, Protocol::Udp));
        k.l4proto = 1;
        assert!(destination(&k).is_none(), "ICMP holds no ports");
        k.l4proto = 6;
        k.family = 0;
        assert!(destination(&k).is_none());
    }

    #[test]
    fn series_fold_namespaces_only_when_asked() {
        let key = |netns: u32, l4proto: u8| {
            let mut k = NatDropKey { netns, family: AF_INET, l4proto, port: 83, ..NatDropKey::default() };
            k.nat_address[..4].copy_from_slice(&[10, 0, 0, 1]);
            k.remote[..4].copy_from_slice(&[10, 0, 0, 2]);
            k
        };
        let raw = vec![(key(1, 6), 2), (key(2, 6), 3), (key(1, 1), 4)];
        let one = crate::collect::view::nat_failures(raw.clone(), 5, false);
        assert_eq!(one.by_destination.iter().map(|f| (f.netns, f.count)).collect::<Vec<_>>(), vec![(None, 5)]);
        assert_eq!(one.unattributed, 5 + 4, "ICMP has no destination port: unattributed");
        let per = crate::collect::view::nat_failures(raw, 0, true);
        assert_eq!(per.by_destination.iter().map(|f| (f.netns, f.count)).collect::<Vec<_>>(), vec![(Some(1), 2), (Some(2), 3)]);
    }

    /// Needs a readable BTF; on this machine's kernel conntrack is built in.
    #[test]
    fn nat_config_from_running_kernel() {
        let Ok(btf) = super::super::offsets::load_btf() else {
            eprintln!("SKIPPED nat_config_from_running_kernel: no BTF");
            return;
        };
        match nat_config(&btf) {
            Ok((c, _)) => {
                assert!(c.netfilter_drop > 0 && c.skb_nfct > 0 && c.reply_tuple > 0, "{c:?}");
                assert!(c.tuple_dst_u3 > c.tuple_src_port && c.tuple_dst_protonum > c.tuple_dst_u3, "{c:?}");
            }
            Err(e) => eprintln!("SKIPPED nat_config_from_running_kernel: {e}"),
        }
        if let Some((start, end)) = function_range("nf_hook_slow") {
            assert!(start < end && end - start < 1 << 16, "{start:#x}..{end:#x}");
        }
    }
}
