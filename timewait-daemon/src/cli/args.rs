//! The command line (clap): every flag and subcommand, and the man page and completions made from them.
//!
//! Every option is also a key of the TOML config file; flag > file >
//! default (see config.rs).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `timewaitd --version`: the package version and the commit built.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("TIMEWAIT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "timewaitd", version = VERSION, about = "TCP TIME_WAIT and port-exhaustion metrics per remote, from eBPF", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run` (also accepted without the subcommand).
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run(RunArgs),
    /// Load and attach every program the daemon would use (then detach), and say per signal which path serves it: exit 0 when the daemon can run here, 1 when not.
    Check {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Live view of the busiest remotes, ports, SYN outcomes and exhaustion ratios, from a running daemon's API.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[command(flatten)]
        run: RunArgs,
    },
    /// One-shot grouped view, like `ss` but per remote: from a running daemon's API, or the kernel if none.
    Snapshot {
        /// Print the JSON of /api/v1/snapshot instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Write the man page (timewaitd.8) and shell completions (bash, zsh, fish) into DIR, for packaging.
    #[command(hide = true)]
    GenerateAssets {
        /// Folder to write into (created when missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `timewaitd generate-assets DIR`: `DIR/timewaitd.8` and
/// `DIR/completions/{timewaitd.bash,_timewaitd,timewaitd.fish}`, from these
/// definitions (clap_mangen, clap_complete).
pub fn generate_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    use clap_complete::Shell;
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").render(&mut page)?;
    std::fs::write(dir.join("timewaitd.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "timewaitd", &comp)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML file with the same keys as these flags, e.g. `top-remotes = 50`, `[web] listen-address = "..."`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve /metrics on [default: 127.0.0.1:19868; `[::]:19868` to expose].
    #[arg(long = "web.listen-address", value_name = "ADDR:PORT")]
    pub listen_address: Option<String>,
    /// TLS and basic auth, in the Prometheus exporter-toolkit web config format (YAML).
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Remotes beyond the N busiest are summed into remote="other" [default: 100].
    #[arg(long, value_name = "N")]
    pub top_remotes: Option<usize>,
    /// Per remote and direction, ports beyond the N busiest are summed into port="other" [default: 10].
    #[arg(long, value_name = "N")]
    pub top_ports: Option<usize>,
    /// Fold IPv4 remotes into /P blocks before ranking [default: 32, no folding].
    #[arg(long, value_name = "P")]
    pub aggregate_ipv4_prefix: Option<u8>,
    /// Fold IPv6 remotes into /P blocks before ranking [default: 128, no folding].
    #[arg(long, value_name = "P")]
    pub aggregate_ipv6_prefix: Option<u8>,
    /// Source ports one remote can use: denominator of timewait_inbound_remote_port_ratio [default: 64512].
    #[arg(long, value_name = "N")]
    pub remote_port_range_size: Option<u64>,
    /// Watch every network namespace, not only the daemon's own.
    #[arg(long)]
    pub all_netns: bool,
    /// Label outbound ports in use, TIME_WAIT sockets and connect()/bind() errors with the cgroup that owns them (the systemd unit, a pod's cgroup, or the cgroup path), and connect() errors with their destination: more series, so off by default.
    #[arg(long)]
    pub attribute_cgroups: bool,
    /// With --attribute-cgroups: cgroups beyond the N busiest are summed into cgroup="other" [default: 20].
    #[arg(long, value_name = "N")]
    pub top_cgroups: Option<usize>,
    /// Capacity of the kernel's minisocket table [default: tcp_max_tw_buckets + 16384].
    #[arg(long, value_name = "N")]
    pub max_tracked_sockets: Option<u32>,
    /// Keys (direction, remote, port) whose count may change within one second: capacity of the kernel's two gauge-delta tables, drained every second; the per-remote SYN tables get half, and beyond that many remotes the smallest SYN totals fold into remote="other" [default: 32768].
    #[arg(long, value_name = "N")]
    pub max_series: Option<u32>,
    /// Seconds between reconciliations with the kernel's socket tables (a walk of them, socket by socket); a lost event triggers one at once anyway; 0 turns the periodic ones off [default: 60].
    #[arg(long, value_name = "SECS")]
    pub reconcile_interval: Option<u64>,
    /// Way into the kernel: auto (fentry where it attaches, else kprobes, else tracepoints), or only one of them [default: auto].
    #[arg(long, value_name = "PATH", value_enum)]
    pub probe_path: Option<crate::kernel::paths::ProbePath>,
    /// Where the fentry hooks are refused (the tracepoint path): also count TCP bind() EADDRINUSE through the syscalls/sys_enter_bind and sys_exit_bind tracepoints, which sends every system call of every process through the kernel's slow path (50 ns more a call here, BENCHMARKS.md scenario 8); off by default.
    #[arg(long)]
    pub syscall_tracepoints: bool,
    /// NAT allocation failures per destination (packets conntrack dropped for want of a NAT port): auto (where conntrack is loaded), on, off [default: auto].
    #[arg(long, value_name = "MODE", value_enum)]
    pub nat: Option<super::config::NatMode>,
    /// Log filter (tracing EnvFilter syntax) [default: info].
    #[arg(long = "log.level", value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own consistency checks of the definitions (names, conflicts).
    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
