//! `ether`: the node binary. Thin: parses the command line and calls the engine library.
use std::process::ExitCode;

use clap::Parser;
use ether_engine::cli::{AdminArgs, AdminCommand, Cli, Command, ServeArgs, TokenArgs};
use ether_engine::config::{Config, LogFormat};
use ether_engine::node;
use signal_hook::consts::{SIGINT, SIGTERM};

/// mimalloc unless built with `--no-default-features` (see `ether_engine::allocator`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ether_engine::allocator::setup();
    let cli = Cli::parse();
    // A misspelt variable would otherwise be ignored without a word.
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for warning in ether_engine::config::env_warnings(names) {
        eprintln!("ether: warning: {warning}");
    }
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Token(args) => token(&args),
        Command::Admin(args) => admin(&args),
    }
}

/// Runs `f` (reading the configuration, before the node's own logging is set up) with its
/// warnings written to stderr, e.g. a secrets file others may read; without a subscriber
/// they would be dropped.
fn with_load_warnings<T>(f: impl FnOnce() -> T) -> T {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish();
    tracing::subscriber::with_default(subscriber, f)
}

fn load(args: &ServeArgs) -> Result<Config, ExitCode> {
    with_load_warnings(|| Config::load(args, |k| std::env::var(k).ok())).map_err(|e| {
        eprintln!("ether: configuration error: {e}");
        ExitCode::from(2)
    })
}

fn init_logs(config: &Config) {
    // `log.level` only (validated by `config`; flag > env `ETHER_LOG_LEVEL` > file).
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    // Colours only for a terminal: a log file or journald would get escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logs(&config);
    let generated = config.secrets_generated.clone();
    let data_dir = config.node.data_dir.clone();
    let auth = config.auth.clone();
    let drain_timeout = node::drain_timeout(&config);
    let signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ether: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match node::start(config) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ether: {e}");
            return ExitCode::FAILURE;
        }
    };
    let p = handle.ports;
    println!("ether: node up. client ws://{}/ws  api http://{}  admin http://{}", p.client, p.api, p.admin);
    println!("ether: data dir {} (ports in ports.json)", data_dir.display());
    if let Some(note) = ether_engine::secrets::first_start_note(&generated, &auth, &data_dir, p.api) {
        println!("{note}");
    }
    let mut signals = signals;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "draining, then stopping (signal again to stop at once)");
    }
    // Drain: terminals are told to reconnect elsewhere and closed within the drain window.
    handle.shared.start_drain();
    let deadline = std::time::Instant::now() + drain_timeout;
    while handle.shared.connections() > 0 && std::time::Instant::now() < deadline {
        if signals.pending().next().is_some() {
            tracing::warn!("second signal: stopping now");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    handle.stop();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn token(args: &TokenArgs) -> ExitCode {
    // Reads the node's secret (configured or in <data>/secrets.toml); never creates one, so a
    // mistyped --data is an error instead of a token no node accepts.
    let secret = match with_load_warnings(|| ether_engine::config::token_secret(args, |k| std::env::var(k).ok())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ether token: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = ether_engine::auth::TokenKeys::new(secret.expose());
    match keys.mint(&args.user, args.ttl, args.device.as_deref()) {
        Ok((token, _)) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ether token: {e}");
            ExitCode::from(2)
        }
    }
}

fn admin(args: &AdminArgs) -> ExitCode {
    let target = match with_load_warnings(|| ether_engine::config::admin_target(args, |k| std::env::var(k).ok())) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ether admin: {e}");
            return ExitCode::from(2);
        }
    };
    let cmd = match &args.command {
        AdminCommand::Stats => ether_admin::cli::AdminCommand::Stats,
        AdminCommand::Connections => ether_admin::cli::AdminCommand::Connections(Default::default()),
        AdminCommand::User { uid } => ether_admin::cli::AdminCommand::User { uid: uid.clone() },
        AdminCommand::Kick { uid, device, revoke } => ether_admin::cli::AdminCommand::Kick {
            uid: uid.clone(),
            device: device.clone(),
            reason: None,
            revoke: *revoke,
        },
        AdminCommand::Drain => ether_admin::cli::AdminCommand::Drain,
    };
    let tls = match &args.ca {
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| ether_sdk::tls_config_with_roots(&pem).map_err(|e| e.to_string()))
        {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("ether admin: --ca {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    match ether_admin::cli::run_with_tls(&target.addr, target.token.expose(), cmd, args.json, tls) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ether admin: {e}");
            ExitCode::FAILURE
        }
    }
}
