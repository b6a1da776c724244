//! Command line: `pgrelay [--config F]` runs the proxy; `pgrelay check` validates a config; `pgrelay upgrade`
//! replaces a running proxy with a new binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgrelay::config::Config;

#[derive(Parser)]
#[command(name = "pgrelay", version, about = "PostgreSQL connection-pooling proxy")]
struct Cli {
    /// Config file.
    #[arg(long, short = 'c', global = true, default_value = "proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Validate a config file; with a running pgrelay's file, show what a reload would change.
    Check {
        /// Compare against this (running) config and print the diff.
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Explain captured slow queries and recommend indexes (checked with HypoPG when available).
    Advise {
        /// A slow-query JSON-lines file (`[slow_query] log`) instead of asking the running pgrelay.
        #[arg(long, requires = "database_url")]
        slow_log: Option<PathBuf>,
        /// Database to explain against, with --slow-log: postgres://user:pass@host:port/db or key=value pairs.
        #[arg(long)]
        database_url: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Replace the running pgrelay (named by `[proxy] pidfile`) with a new binary without refusing a connection.
    Upgrade {
        /// The new binary; default: this one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Append the new process's output here (default: this terminal).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Send the old process SIGTERM (close clients at their next transaction boundary) instead of SIGUSR2
        /// (keep them until they leave, up to shutdown_timeout).
        #[arg(long)]
        drain: bool,
        /// Wait until the old process has exited.
        #[arg(long)]
        wait: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Check { against } => check(&cli.config, against.as_deref()),
        Cmd::Run => run(&cli.config),
        Cmd::Advise { slow_log, database_url, json } => advise(&cli.config, slow_log, database_url, json),
        Cmd::Upgrade { binary, log, drain, wait } => {
            let binary = match binary.map(Ok).unwrap_or_else(std::env::current_exe) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot find this binary: {e}");
                    return ExitCode::from(1);
                }
            };
            match pgrelay::app::upgrade(&cli.config, &binary, log.as_deref(), drain, wait) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn check(path: &std::path::Path, against: Option<&std::path::Path>) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = pgrelay::state::load_userlist(&cfg) {
        eprintln!("error: auth.file: {e}");
        return ExitCode::from(1);
    }
    println!("{}: ok ({} databases)", path.display(), cfg.databases.len());
    if let Some(old) = against {
        match Config::load(old) {
            Ok(o) => print!("{}", o.diff(&cfg)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let workers = if cfg.proxy.workers == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        cfg.proxy.workers
    };
    // One worker: a current-thread runtime (no work-stealing machinery, no cross-thread wake-ups: the accept
    // loop, every session and the I/O driver share one thread). More workers: the multi-thread scheduler.
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let addr: std::net::SocketAddr = match cfg.proxy.listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("error: proxy.listen: not an address");
            return ExitCode::from(1);
        }
    };
    let shared = match pgrelay::app::build(cfg, path.to_path_buf()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: auth.file: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(async move {
        let handlers = pgrelay::app::signal_handlers();
        let listener = pgrelay::app::listen(&shared, addr)?;
        pgrelay::app::run(shared, listener, handlers).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn advise(config: &std::path::Path, slow_log: Option<PathBuf>, url: Option<String>, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let report = rt.block_on(async {
        match (slow_log, url) {
            (Some(log), Some(url)) => pgrelay::advisor::run::from_files(&log, &url).await,
            _ => pgrelay::advisor::run::from_config(config).await,
        }
    });
    match report {
        Ok(r) if json => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}", pgrelay::advisor::render(&r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
