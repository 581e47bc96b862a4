//! Effective configuration: flag > config file > default, validated once.

use std::{fs, net::SocketAddr, path::Path};

use serde::Deserialize;
use thiserror::Error;

use super::args::RunArgs;
use crate::{
    kernel::{load::LoadOptions, paths::ProbePath},
    model::aggregate::AggOptions,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:19868";
/// Capacity of each gauge-delta table (see `--max-series`).
pub const DEFAULT_MAX_SERIES: u32 = 32_768;
/// Seconds between reconciliation walks when nothing was lost: one walk of
/// 100,000 TIME_WAIT sockets takes about 0.2 s of one core (BENCHMARKS.md,
/// scenario 6), so every 60 s is about 0.3 %, and a churning population is
/// corrected within one TIME_WAIT lifetime. A lost event triggers one at once.
pub const DEFAULT_RECONCILE_INTERVAL: u64 = 60;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("config file {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("invalid web.listen-address {0:?}: expected ADDR:PORT, e.g. 127.0.0.1:19868 or [::]:19868")]
    ListenAddress(String),
    #[error("invalid {key} {value}: must be {range}")]
    Range { key: &'static str, value: String, range: &'static str },
}

/// The config file: the same keys as the flags (dotted flags are tables).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    web: Option<WebFile>,
    log: Option<LogFile>,
    top_remotes: Option<usize>,
    top_ports: Option<usize>,
    aggregate_ipv4_prefix: Option<u8>,
    aggregate_ipv6_prefix: Option<u8>,
    all_netns: Option<bool>,
    attribute_cgroups: Option<bool>,
    top_cgroups: Option<usize>,
    max_tracked_sockets: Option<u32>,
    max_series: Option<u32>,
    remote_port_range_size: Option<u64>,
    reconcile_interval: Option<u64>,
    probe_path: Option<ProbePath>,
    syscall_tracepoints: Option<bool>,
    nat: Option<crate::nat::reader::NatMode>,
    nat_interval: Option<u64>,
    nat_port_range: Option<String>,
    nat_max_destinations: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct WebFile {
    listen_address: Option<String>,
    /// `web.config.file`, as the flag `--web.config.file`.
    config: Option<WebConfigFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct WebConfigFile {
    file: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LogFile {
    level: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub web_config_file: Option<std::path::PathBuf>,
    pub agg: AggOptions,
    pub all_netns: bool,
    /// `--attribute-cgroups`.
    pub attribute_cgroups: bool,
    pub max_tracked_sockets: Option<u32>,
    pub max_series: u32,
    pub log_level: String,
    /// Seconds between reconciliations; 0 = off.
    pub reconcile_interval: u64,
    /// Which way into the kernel.
    pub probe_path: ProbePath,
    /// `--syscall-tracepoints`: bind() errors on the tracepoint path.
    pub syscall_tracepoints: bool,
    /// `--nat`, `--nat-interval`, `--nat-port-range`, `--nat-max-destinations`.
    pub nat: crate::nat::reader::NatOptions,
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let p = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|err| ConfigError::Read { path: p.clone(), err })?;
    parse_toml(&text).map_err(|msg| ConfigError::Parse { path: p, msg })
}

fn parse_toml(text: &str) -> Result<FileConfig, String> {
    // toml's messages span several lines with a source excerpt: keep the first.
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!("line {line}: {msg}")
            }
            None => msg,
        }
    })
}

pub fn resolve(args: &RunArgs) -> Result<Config, ConfigError> {
    let file = match &args.config {
        Some(path) => parse_file(path)?,
        None => FileConfig::default(),
    };
    let listen_s = args
        .listen_address
        .clone()
        .or_else(|| file.web.as_ref().and_then(|w| w.listen_address.clone()))
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen_s.parse().map_err(|_| ConfigError::ListenAddress(listen_s.clone()))?;
    let top_remotes = args.top_remotes.or(file.top_remotes).unwrap_or(100);
    if top_remotes == 0 {
        return Err(ConfigError::Range { key: "top-remotes", value: "0".into(), range: "at least 1" });
    }
    let top_ports = args.top_ports.or(file.top_ports).unwrap_or(crate::model::aggregate::DEFAULT_TOP_PORTS);
    if top_ports == 0 {
        return Err(ConfigError::Range { key: "top-ports", value: "0".into(), range: "at least 1" });
    }
    let v4 = args.aggregate_ipv4_prefix.or(file.aggregate_ipv4_prefix).unwrap_or(32);
    if v4 > 32 {
        return Err(ConfigError::Range { key: "aggregate-ipv4-prefix", value: v4.to_string(), range: "0..=32" });
    }
    let v6 = args.aggregate_ipv6_prefix.or(file.aggregate_ipv6_prefix).unwrap_or(128);
    if v6 > 128 {
        return Err(ConfigError::Range { key: "aggregate-ipv6-prefix", value: v6.to_string(), range: "0..=128" });
    }
    let max_series = args.max_series.or(file.max_series).unwrap_or(DEFAULT_MAX_SERIES);
    if max_series == 0 {
        return Err(ConfigError::Range { key: "max-series", value: "0".into(), range: "at least 1" });
    }
    let remote_ports = args
        .remote_port_range_size
        .or(file.remote_port_range_size)
        .unwrap_or(crate::model::aggregate::DEFAULT_REMOTE_PORT_RANGE_SIZE);
    if remote_ports == 0 || remote_ports > 65_536 {
        return Err(ConfigError::Range { key: "remote-port-range-size", value: remote_ports.to_string(), range: "1..=65536" });
    }
    let all_netns = args.all_netns || file.all_netns.unwrap_or(false);
    let attribute_cgroups = args.attribute_cgroups || file.attribute_cgroups.unwrap_or(false);
    let top_cgroups = args.top_cgroups.or(file.top_cgroups).unwrap_or(crate::model::aggregate::DEFAULT_TOP_CGROUPS);
    if top_cgroups == 0 {
        return Err(ConfigError::Range { key: "top-cgroups", value: "0".into(), range: "at least 1" });
    }
    let max_tracked_sockets = args.max_tracked_sockets.or(file.max_tracked_sockets);
    if max_tracked_sockets == Some(0) {
        return Err(ConfigError::Range { key: "max-tracked-sockets", value: "0".into(), range: "at least 1" });
    }
    let probe_path = args.probe_path.or(file.probe_path).unwrap_or_default();
    let nat_interval = args.nat_interval.or(file.nat_interval).unwrap_or(10);
    if nat_interval == 0 {
        return Err(ConfigError::Range { key: "nat-interval", value: "0".into(), range: "at least 1" });
    }
    let nat_port_range = match args.nat_port_range.clone().or(file.nat_port_range) {
        Some(s) => Some(crate::nat::PortRange::parse(&s).map_err(|_| ConfigError::Range {
            key: "nat-port-range",
            value: s.clone(),
            range: "A-B with 1 <= A <= B <= 65535",
        })?),
        None => None,
    };
    let nat_max_destinations = args.nat_max_destinations.or(file.nat_max_destinations).unwrap_or(65_536);
    if nat_max_destinations == 0 {
        return Err(ConfigError::Range { key: "nat-max-destinations", value: "0".into(), range: "at least 1" });
    }
    let nat = crate::nat::reader::NatOptions {
        mode: args.nat.or(file.nat).unwrap_or_default(),
        interval: std::time::Duration::from_secs(nat_interval),
        port_range: nat_port_range,
        max_destinations: nat_max_destinations,
        all_netns: args.all_netns || file.all_netns.unwrap_or(false),
    };
    Ok(Config {
        nat,
        probe_path,
        syscall_tracepoints: args.syscall_tracepoints || file.syscall_tracepoints.unwrap_or(false),
        listen,
        web_config_file: args
            .web_config_file
            .clone()
            .or_else(|| file.web.as_ref().and_then(|w| w.config.as_ref()).and_then(|c| c.file.clone())),
        agg: AggOptions {
            top_remotes,
            top_ports,
            ipv4_prefix: v4,
            ipv6_prefix: v6,
            remote_port_range_size: remote_ports,
            per_netns: all_netns,
            top_cgroups,
        },
        all_netns,
        attribute_cgroups,
        max_tracked_sockets,
        max_series,
        reconcile_interval: args.reconcile_interval.or(file.reconcile_interval).unwrap_or(DEFAULT_RECONCILE_INTERVAL),
        log_level: args
            .log_level
            .clone()
            .or_else(|| file.log.and_then(|l| l.level))
            .unwrap_or_else(|| "info".into()),
    })
}

/// Lives here, not in `kernel`: the kernel side knows nothing of the
/// command line.
impl LoadOptions {
    /// What the daemon's configuration asks for.
    pub fn of(cfg: &Config) -> Self {
        Self {
            all_netns: cfg.all_netns,
            max_tracked_sockets: cfg.max_tracked_sockets,
            max_series: cfg.max_series,
            probe_path: cfg.probe_path,
            attribute_cgroups: cfg.attribute_cgroups,
            syscall_tracepoints: cfg.syscall_tracepoints,
            // auto: where conntrack is loaded (its per-namespace sysctls exist).
            nat_drops: match cfg.nat.mode {
                crate::nat::reader::NatMode::On => true,
                crate::nat::reader::NatMode::Off => false,
                crate::nat::reader::NatMode::Auto => Path::new("/proc/sys/net/netfilter/nf_conntrack_count").exists(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = resolve(&RunArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.agg.top_remotes, 100);
        assert_eq!(c.agg.top_ports, crate::model::aggregate::DEFAULT_TOP_PORTS);
        assert_eq!((c.reconcile_interval, c.max_series), (DEFAULT_RECONCILE_INTERVAL, DEFAULT_MAX_SERIES));
        assert_eq!((c.agg.ipv4_prefix, c.agg.ipv6_prefix), (32, 128));
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("tw-cfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        fs::write(
            &path,
            "top-remotes = 7\ntop-ports = 3\naggregate-ipv4-prefix = 24\n[web]\nlisten-address = \"127.0.0.1:1\"\nconfig.file = \"/etc/w.yml\"\n",
        )
        .unwrap();
        let mut args = RunArgs { config: Some(path.clone()), ..Default::default() };
        let c = resolve(&args).unwrap();
        assert_eq!((c.agg.top_remotes, c.agg.top_ports, c.agg.ipv4_prefix, c.listen.port()), (7, 3, 24, 1));
        assert_eq!(c.web_config_file.as_deref(), Some(Path::new("/etc/w.yml")), "web.config.file, as the flag");
        args.top_remotes = Some(9);
        assert_eq!(resolve(&args).unwrap().agg.top_remotes, 9);
        fs::remove_dir_all(dir).unwrap();
    }

    /// The file the package installs (/etc/timewait/timewaitd.toml) parses,
    /// means the defaults as shipped (every key commented out), and says the
    /// defaults truly: uncommented, it resolves to the same configuration
    /// (but for the two keys whose default is "none": computed, absent).
    #[test]
    fn packaged_config_is_the_defaults() {
        let text = include_str!("../../../deploy/debian/timewaitd.toml");
        let dir = std::env::temp_dir().join(format!("tw-pkgcfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let resolve_text = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap()
        };
        let defaults = format!("{:?}", resolve(&RunArgs::default()).unwrap());
        assert_eq!(format!("{:?}", resolve_text("as-shipped.toml", text)), defaults);
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-' || c == '.')) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.matches(" = ").count() >= 15, "every key is in the file:\n{uncommented}");
        let mut c = resolve_text("uncommented.toml", &uncommented);
        assert_eq!(c.web_config_file.take(), Some(std::path::PathBuf::from("/etc/timewait/web.yml")));
        assert!(c.max_tracked_sockets.take().is_some());
        assert_eq!(format!("{c:?}"), defaults);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_input_is_one_clear_line() {
        let e = parse_toml("top-remots = 3").unwrap_err();
        assert!(e.contains("line 1") && e.contains("top-remots"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let args = RunArgs { listen_address: Some("nope".into()), ..Default::default() };
        assert!(matches!(resolve(&args), Err(ConfigError::ListenAddress(_))));
        let args = RunArgs { aggregate_ipv4_prefix: Some(33), ..Default::default() };
        assert!(resolve(&args).unwrap_err().to_string().contains("0..=32"));
    }
}

#[cfg(test)]
mod proptests {
    use clap::Parser as _;

    use super::*;

    proptest::proptest! {
        /// No config file, however broken, panics the parser: it is an error line.
        #[test]
        fn config_files_never_panic(text in "\\PC{0,200}") {
            if let Err(msg) = parse_toml(&text) {
                proptest::prop_assert!(!msg.contains('\n'), "one line: {msg}");
            }
        }

        /// Structured near-misses of real keys and values.
        #[test]
        fn config_values_never_panic(
            key in "(top-remotes|top-ports|aggregate-ipv4-prefix|aggregate-ipv6-prefix|max-series|reconcile-interval|all-netns|nope)",
            value in "(-?[0-9]{1,25}|\"[a-z:.0-9]{0,20}\"|true|\\[\\]|\\{\\})",
        ) {
            let _ = parse_toml(&format!("{key} = {value}\n"));
        }

        /// No command line panics: clap reports it, resolve() reports it.
        #[test]
        fn command_lines_never_panic(args in proptest::collection::vec("(--[a-z.-]{1,24}|-?[0-9]{1,12}|[a-z0-9:.\\[\\]]{0,20})", 0..6)) {
            let argv = std::iter::once("timewaitd".to_string()).chain(args);
            if let Ok(cli) = crate::cli::args::Cli::try_parse_from(argv) {
                let _ = resolve(&cli.run);
            }
        }
    }
}
