//! The `legate` command: `legate run -c plugins.yaml`, `legate check -c plugins.yaml`,
//! `legate plugin build PATH`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use legate_host::{config, server};

/// Legate: a reverse proxy whose filter chains run sandboxed WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "plugins.yaml")]
        config: PathBuf,
        /// Worker threads (default: available cores).
        #[arg(long)]
        concurrency: Option<usize>,
        /// The zone this process runs in (overrides the config's `local_zone`).
        #[arg(long)]
        local_zone: Option<String>,
    },
    /// Validate a config file without starting; exit 1 and print every error if invalid.
    Check {
        /// Config file.
        #[arg(short, long, default_value = "plugins.yaml")]
        config: PathBuf,
    },
    /// Plugin tools: `legate plugin build PATH [--out FILE]`.
    Plugin {
        #[command(subcommand)]
        command: legate_host::plugin_build::PluginCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Plugin { command } => legate_host::plugin_build::run(command),
        Command::Check { config } => match config::load_file(&config) {
            Ok(cfg) => match legate_host::wasm::check_plugins(&cfg) {
                Ok(()) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: error: {e:#}", config.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprint!("{e}");
                eprintln!();
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            concurrency,
            local_zone,
        } => match run(&config, concurrency, local_zone) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(
    path: &std::path::Path,
    concurrency: Option<usize>,
    local_zone: Option<String>,
) -> anyhow::Result<()> {
    let mut cfg = match config::load_file(path) {
        Ok(c) => c,
        Err(e) => anyhow::bail!("invalid config\n{e}"),
    };
    if local_zone.is_some() {
        cfg.set_local_zone(local_zone);
    }
    let mut opts = server::Options::default();
    if let Some(n) = concurrency {
        opts.concurrency = n;
    }
    let handle = server::start(cfg, opts).context("starting legate")?;
    let mut drain = handle.drain_signal();
    // Signals are handled on a small runtime of their own; workers own theirs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            _ = drain.wait_for(|d| *d) => tracing::info!("drain requested on the admin port"),
        }
        anyhow::Ok(())
    })?;
    handle.shutdown();
    handle.wait()?;
    tracing::info!("stopped");
    Ok(())
}
