//! The `legate` command: `legate run -c plugins.yaml`, `legate check -c plugins.yaml`,
//! `legate plugin build PATH`, `legate plugin list`, `legate plugin measure NAME`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use legate_host::{config, hot_restart, server};

/// mimalloc instead of the system allocator: a proxy allocates and frees small
/// objects on every request (header maps, buffers, futures), and glibc's malloc
/// spent about a quarter of the per-request instructions there (bench/README.md,
/// "Instructions per request"). Envoy links tcmalloc for the same reason.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `legate --help` adds after the commands: the environment variables
/// Legate reads, which an operator otherwise finds only in the docs (an Envoy
/// user looks for `--log-level` in the help and finds no flag).
const ENVIRONMENT_HELP: &str = "\
Environment:
  LEGATE_LOG         log filter: a level (error, warn, info, debug, trace) or tracing
                     directives (`info,legate_host::proxy=debug`); default
                     `info,rustls=error`; the admin API's POST /logging changes it live
  LEGATE_WASM_CACHE  directory of compiled plugins (default: $XDG_CACHE_HOME/legate/wasm
                     or ~/.cache/legate/wasm); `off` compiles every load";

/// Legate: a reverse proxy whose filter chains run sandboxed WebAssembly plugins.
// `name`: the command is `legate`; without it `--version` printed the
// package's name, `legate-host`.
#[derive(Parser)]
#[command(name = "legate", version, about, after_help = ENVIRONMENT_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Worker threads (default: available cores).
        #[arg(long)]
        concurrency: Option<usize>,
        /// The zone this process runs in (overrides the config's `local_zone`).
        #[arg(long)]
        local_zone: Option<String>,
        /// Poll the config file and plugin modules this often and reload on change
        /// (e.g. `1s`, `500ms`); `0` disables the watch. SIGHUP and
        /// `POST /reload` reload at any time.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        watch_interval: Duration,
        /// Hot restart: take the listening sockets of the Legate running with this
        /// config (over its upgrade socket), start, then tell it to drain.
        #[arg(long)]
        upgrade: bool,
        /// The Unix socket hot restarts go through (default: the config file's path
        /// plus `.upgrade.sock`).
        #[arg(long)]
        upgrade_socket: Option<PathBuf>,
    },
    /// Validate a config file without starting; exit 1 and print every error if invalid.
    Check {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Plugin tools: `build` a plugin crate into a component, `list` the
    /// plugins built into this binary, `measure` what an instance costs.
    Plugin {
        #[command(subcommand)]
        command: legate_host::plugin_build::PluginCommand,
    },
}

/// The config `run` and `check` read without `-c`: the demo's, at the
/// repository root.
const DEFAULT_CONFIG: &str = "plugins.yaml";

/// The error for a config path that is the default and is not there: a new
/// user runs `legate run` outside the repository, and "cannot read the config
/// file … check the path given with -c" named a flag they never gave.
fn missing_default_config(path: &std::path::Path) -> Option<String> {
    if path != std::path::Path::new(DEFAULT_CONFIG) || path.exists() {
        return None;
    }
    let here = std::env::current_dir().map_or_else(|_| ".".to_owned(), |d| d.display().to_string());
    Some(format!(
        "no config file: without -c, Legate reads `{DEFAULT_CONFIG}` in the \
         current directory ({here}), and there is none\n  help: give one with -c FILE (e.g. \
         `legate run -c /etc/legate/legate.yaml`); `legate check -c FILE` validates it first"
    ))
}

/// The log filter when `LEGATE_LOG` is unset: `info`, but rustls's only at
/// `error`. rustls warns once per handshake whose SNI is an IP address
/// (`Illegal SNI extension: ignoring IP address presented as hostname`, which
/// RFC 6066 forbids but wrk, health checkers and `openssl s_client -servername
/// 10.0.0.1` send): a line per connection, in the log of every edge proxy.
/// Such a handshake goes on as one without SNI. `LEGATE_LOG` replaces the whole
/// filter (`LEGATE_LOG=info` shows them).
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

/// The log filter from `LEGATE_LOG` ([`DEFAULT_LOG_FILTER`] if unset). A value
/// that does not parse is said on stderr, not taken silently: logging goes on
/// with the default.
fn log_filter() -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let Some(v) = std::env::var_os("LEGATE_LOG") else {
        return EnvFilter::new(DEFAULT_LOG_FILTER);
    };
    let v = v.to_string_lossy();
    match EnvFilter::builder().parse(&*v) {
        Ok(f) => {
            for (d, lv) in misspelt_levels(&v) {
                eprintln!(
                    "legate: LEGATE_LOG: `{d}` is not a level, so it is taken as a target \
                     name (events of targets starting with it); did you mean `{lv}`?"
                );
            }
            f
        }
        Err(e) => {
            eprintln!(
                "legate: LEGATE_LOG={v:?} is not a log filter ({e}); logging with the \
                 default `{DEFAULT_LOG_FILTER}`. Use a level (error, warn, info, debug, \
                 trace) or directives such as `info,legate_host::proxy=debug`."
            );
            EnvFilter::new(DEFAULT_LOG_FILTER)
        }
    }
}

/// The bare directives of a log filter that look like a misspelt level, with
/// the level: a bare word that is not a level is a target name, so `debugg`
/// would log nothing at all, silently.
fn misspelt_levels(filter: &str) -> Vec<(&str, &'static str)> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.contains(['=', ':', '[']))
        .filter_map(|d| {
            let l = d.to_ascii_lowercase();
            LEVELS
                .into_iter()
                .find(|lv| l != *lv && l.len() >= 3 && (l.starts_with(lv) || lv.starts_with(&*l)))
                .map(|lv| (d, lv))
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Colours only on a terminal: a file, journald or `docker logs` would
    // get the escape codes as text.
    // The filter is reloadable: `POST /logging?level=debug` on the admin API
    // changes it in a running process, as Envoy's `/logging`.
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter());
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init();
        legate_host::admin::install_log_filter(handle);
    }
    match cli.command {
        Command::Plugin { command } => legate_host::plugin_build::run(command),
        Command::Check { config } => match missing_default_config(&config) {
            Some(e) => {
                eprintln!("{}: error: {e}", config.display());
                ExitCode::FAILURE
            }
            None => check(&config),
        },
        Command::Run {
            config,
            concurrency,
            local_zone,
            watch_interval,
            upgrade,
            upgrade_socket,
        } => match run(
            &config,
            concurrency,
            local_zone,
            watch_interval,
            upgrade_socket,
            upgrade,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                match e.downcast_ref::<config::ConfigErrors>() {
                    Some(placed) => eprintln!("error: invalid config\n{placed}"),
                    None => eprintln!("error: {e:#}"),
                }
                ExitCode::FAILURE
            }
        },
    }
}

/// `legate check`: every error of the config, or `ok`.
fn check(config: &std::path::Path) -> ExitCode {
    match config::check_file(config) {
        Ok(cfg) => match legate_host::server::check(std::sync::Arc::new(cfg)) {
            Ok(()) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            // A plugin refusing its config is placed in the file
            // (`file:line:col: error: ...`), as the parse's own errors are.
            Err(e) => {
                match e.downcast_ref::<config::ConfigErrors>() {
                    Some(placed) => eprintln!("{placed}"),
                    None => eprintln!("{}: error: {e:#}", config.display()),
                }
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprint!("{e}");
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

/// `1s`, `250ms`, `0`.
fn parse_interval(s: &str) -> Result<Duration, String> {
    // The config's duration syntax (`500ms`, `1.5s`, `1m`), and `0` for off.
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    legate_host::config::Dur::parse(s).map(|d| d.get())
}

/// Descriptors kept for what is not a connection: plugins' files, the access
/// log, health checks, DNS, the runtimes' own.
const FD_MARGIN: u64 = 256;

/// Raises the soft limit of open files (`RLIMIT_NOFILE`) to the hard limit, as
/// Go programs do at start: the soft limit is often 1024 (systemd's default),
/// which ~1000 idle connections exhaust long before `max_connections` engages,
/// while the hard limit (systemd's default 524288, `LimitNOFILE=`) is what the
/// operator allows. Logs the limit it runs with, and warns when the listeners'
/// `max_connections` could exceed it (each proxied connection may hold an
/// upstream one too), since accepts then fail with `EMFILE` instead.
fn raise_fd_limit(cfg: &config::Config) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::info!("open-file limit: {hard} (raised from {soft})");
                    Some(hard)
                }
                Err(e) => {
                    tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
                    Some(soft)
                }
            }
        }
        (soft, _) => {
            if let Some(soft) = soft {
                tracing::info!("open-file limit: {soft}");
            }
            soft
        }
    };
    let Some(soft) = soft else {
        return;
    };
    let connections: u64 = cfg
        .listeners
        .iter()
        .map(|l| u64::from(l.value.limits.max_connections))
        .sum();
    let needed = connections.saturating_mul(2).saturating_add(FD_MARGIN);
    if needed > soft {
        tracing::warn!(
            "open-file limit {soft} is below what the listeners' max_connections \
             ({connections} in all) may need, about {needed} with their upstream \
             connections: raise the hard limit (systemd `LimitNOFILE=`, `ulimit -Hn`) or \
             lower max_connections"
        );
    }
}

/// Takes over the running process's sockets (`take_over`: a hot restart, over
/// the upgrade socket `upgrade_path`) and starts serving; the handle, and what
/// was taken over (to tell the old process to drain).
fn start(
    cfg: config::Config,
    opts: server::Options,
    mut process: server::ProcessOptions,
    take_over: bool,
    upgrade_path: &std::path::Path,
) -> anyhow::Result<(server::Handle, Option<hot_restart::Inherited>)> {
    let mut inherited = if take_over {
        Some(hot_restart::take_over(upgrade_path).context("hot restart")?)
    } else {
        None
    };
    if let Some(i) = inherited.as_mut() {
        process.inherited = std::mem::take(&mut i.listeners);
        process.inherited_admin = i.admin.take();
        process.inherited_stats = Some(i.stats.clone());
    }
    match server::start_with(cfg, opts, process).context("starting legate") {
        Ok(handle) => Ok((handle, inherited)),
        Err(e) => {
            // The old process keeps serving; its log says why.
            if let Some(i) = inherited {
                i.refuse(&e);
            }
            Err(e)
        }
    }
}

fn run(
    path: &std::path::Path,
    concurrency: Option<usize>,
    local_zone: Option<String>,
    watch_interval: Duration,
    upgrade_socket: Option<PathBuf>,
    take_over: bool,
) -> anyhow::Result<()> {
    let upgrade_path = upgrade_socket.unwrap_or_else(|| hot_restart::default_socket(path));
    let upgrade_path_for_start = upgrade_path.clone();
    if let Some(e) = missing_default_config(path) {
        anyhow::bail!("{e}");
    }
    let mut cfg = match config::check_file(path) {
        Ok(c) => c,
        Err(e) => anyhow::bail!("invalid config\n{e}"),
    };
    if local_zone.is_some() {
        cfg.set_local_zone(local_zone.clone());
    }
    raise_fd_limit(&cfg);
    let mut opts = server::Options::default();
    if let Some(n) = concurrency {
        opts.concurrency = n;
    }
    let process = server::ProcessOptions {
        config_path: Some(path.to_path_buf()),
        local_zone,
        watch_interval: (!watch_interval.is_zero()).then_some(watch_interval),
        serves_upgrade_socket: true,
        ..Default::default()
    };
    // Signals are handled on a small runtime of their own; workers own theirs.
    // Every handler is installed before anything starts. SIGHUP's default
    // action is to exit, and one sent while this process starts (`kill -HUP
    // $(pidof legate)` during a hot restart reaches both processes) must not
    // kill it; it reloads once the process serves. SIGUSR1's too (its default
    // action also exits): logrotate sends it to have the access log reopened,
    // as nginx and Envoy do. SIGTERM and SIGINT stop a start at once (below):
    // their default action would too, but not as PID 1 of a PID namespace (the
    // container image's `ENTRYPOINT ["legate"]`), to which the kernel delivers
    // no signal it has no handler for — a pod would sit `Terminating` for its
    // grace period while plugins compiled.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    let (mut hup, mut usr1, mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _in = rt.enter();
        (
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
            signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
        )
    };
    // Starting (taking the running process's sockets, compiling every plugin)
    // runs on a blocking thread while this one waits for SIGTERM or SIGINT: one
    // ends the process at once, with status 0 as after a drain (nothing was
    // served, so nothing is cut). If starting fails or is stopped, the old
    // process of a hot restart keeps serving: it drains only when told to below.
    let starting =
        rt.spawn_blocking(move || start(cfg, opts, process, take_over, &upgrade_path_for_start));
    let started = rt.block_on(async {
        tokio::select! {
            r = starting => Ok(r),
            _ = term.recv() => Err("SIGTERM"),
            _ = int.recv() => Err("SIGINT"),
        }
    });
    let started = match started {
        Ok(r) => r,
        Err(signal) => {
            tracing::info!("{signal} while starting: stopped before serving");
            std::process::exit(0);
        }
    };
    let (handle, inherited) = started.context("the start thread")??;
    // Receives the final counts of the process this one took over from.
    let mut predecessor = None;
    if let Some(i) = inherited {
        // This process serves on every socket already: a handover the old
        // process did not confirm (it exited, or drained meanwhile) must not
        // stop it too, which would leave nothing serving.
        match i.finish(handle.shared(), handle.adopted()) {
            Ok(thread) => predecessor = Some(thread),
            Err(e) => tracing::error!(
                "hot restart: {e:#}; serving anyway (if the old process still runs, \
                 stop it: both accept on the same sockets)"
            ),
        }
    }
    // Not serving the upgrade socket costs only hot restarts (a container
    // with a read-only root file system cannot make one next to its config):
    // a warning with the fix, not an error.
    let upgrade = match handle.admin_socket() {
        Ok(admin) => match hot_restart::serve(&handle.shared(), &upgrade_path, admin, take_over) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!(
                    "hot restart will not be available: {e:#} (give --upgrade-socket a \
                     path in a writable directory to have it)"
                );
                None
            }
        },
        Err(e) => {
            tracing::warn!("hot restart will not be available: {e}");
            None
        }
    };
    let shared = handle.shared();
    // Served (or given up on): `/ready` may say LIVE.
    shared
        .upgrade_socket_pending
        .store(false, std::sync::atomic::Ordering::Release);
    let mut drain = handle.drain_signal();
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
                _ = drain.wait_for(|d| *d) => tracing::info!("drain requested"),
                _ = usr1.recv() => {
                    // The lines waiting go to the old file first (moved away
                    // by logrotate), then the path is opened again.
                    let n = shared.log_writers.reopen();
                    if n > 0 {
                        tracing::info!("SIGUSR1: reopening the access logs ({n} destinations)");
                    }
                    continue;
                }
                _ = hup.recv() => {
                    // Config and every plugin module are read again; the result is
                    // logged, counted and shown by `GET /reload`. Not awaited: a
                    // SIGTERM during a long reload (a plugin compiling) drains at
                    // once (reloads take one lock, so they run one at a time).
                    tracing::info!("SIGHUP: reloading {}", path.display());
                    let shared = shared.clone();
                    drop(tokio::task::spawn_blocking(move || {
                        legate_host::reload::reload_config(&shared, legate_host::reload::Trigger::Signal)
                    }));
                    continue;
                }
            }
            break;
        }
    });
    handle.shutdown();
    // Draining: no upgrade can take over any more, and the file must not
    // outlive the process.
    if let Some(u) = &upgrade {
        u.remove();
    }
    // A second SIGTERM or SIGINT during the drain stops at once (as a second
    // Ctrl-C is expected to), cutting the connections still open.
    let stopped = rt.block_on(async {
        let finals = shared.clone();
        let mut wait = tokio::task::spawn_blocking(move || {
            let stopped = handle.wait();
            // After the drain, not before: a second signal while the counts
            // are awaited stops at once too.
            hot_restart::send_final_stats(&finals, predecessor);
            stopped
        });
        loop {
            tokio::select! {
                r = &mut wait => break r.unwrap_or_else(|e| Err(anyhow::anyhow!("drain: {e}"))),
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => continue,
            }
            tracing::warn!("second signal: stopping now, without waiting for the drain");
            // The lines of the requests that ended are written out first.
            shared.log_writers.close();
            std::process::exit(1);
        }
    });
    stopped?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The help's Environment section states the default log filter in force.
    #[test]
    fn the_help_states_the_default_log_filter() {
        assert!(
            ENVIRONMENT_HELP.contains(&format!("`{DEFAULT_LOG_FILTER}`")),
            "{ENVIRONMENT_HELP}"
        );
    }

    #[test]
    fn a_misspelt_level_is_named() {
        assert_eq!(misspelt_levels("debugg"), [("debugg", "debug")]);
        assert_eq!(
            misspelt_levels("inf, hyper=debug,warning"),
            [("inf", "info"), ("warning", "warn")]
        );
        for fine in [
            "info",
            "DEBUG",
            "hyper",
            "legate_host::proxy=trace",
            "h2,off",
            "",
        ] {
            assert!(misspelt_levels(fine).is_empty(), "{fine}");
        }
    }

    #[test]
    fn the_watch_interval_is_written_as_config_durations() {
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_interval("5").is_err_and(|e| e.contains("no unit")));
    }
}
