//! Command-line shape of the `ether` binary (clap derive) and the humane duration parser; owns
//! argument parsing only and must not read env vars, files or sockets (that is `config`'s job).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Longest `--ttl` accepted by `ether token`: what the node mints at most (365 days), so a
/// ttl the command line takes is never refused afterwards.
pub use crate::auth::TOKEN_TTL_MAX;

/// The `ether` command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "ether", version, about = "Ether-IM push node", propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The `ether` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run a node (flags override env `ETHER_<SECTION>_<KEY>`, which overrides the file).
    Serve(Box<ServeArgs>),
    /// Print a terminal JWT signed with the node's secret.
    Token(TokenArgs),
    /// Call a node's admin port.
    Admin(AdminArgs),
}

/// Flags of `ether serve`; every one optional, layered over env and file by `config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ServeArgs {
    /// TOML configuration file (else `ETHER_CONFIG`, else none).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Shard threads, 1..=256 (`node.shards`; default: online CPUs).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Data directory: store, secrets, ports.json (`node.data_dir`; default ./ether-data).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Redis URL; turns the node into a cluster member (`cluster.redis_url`).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// This node's id in the cluster (`node.id`, alias `cluster.node_id`).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Terminal WebSocket listener (`listen.client`; default 0.0.0.0:9000).
    #[arg(long, value_name = "ADDR")]
    pub listen_client: Option<SocketAddr>,
    /// Business REST listener (`listen.api`; default 127.0.0.1:9001).
    #[arg(long, value_name = "ADDR")]
    pub listen_api: Option<SocketAddr>,
    /// Admin/metrics listener (`listen.admin`; default 127.0.0.1:9002).
    #[arg(long, value_name = "ADDR")]
    pub listen_admin: Option<SocketAddr>,
    /// Terminal WebSocket listener over TLS, `wss://` (`listen.client_tls`; default none).
    #[arg(long, value_name = "ADDR")]
    pub listen_client_tls: Option<SocketAddr>,
    /// Business REST listener over TLS, `https://` (`listen.api_tls`; default none).
    #[arg(long, value_name = "ADDR")]
    pub listen_api_tls: Option<SocketAddr>,
    /// Admin/metrics listener over TLS, `https://` (`listen.admin_tls`; default none).
    #[arg(long, value_name = "ADDR")]
    pub listen_admin_tls: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listeners (`tls.cert_path`).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listeners (`tls.key_path`).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Log format (`log.format`; default human).
    #[arg(long, value_name = "FORMAT", value_parser = ["human", "json"])]
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `info,ether_engine=debug` (`log.level`; default info).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Any configuration key, e.g. `--set limits.frame_bytes_max=131072` (repeatable; written
    /// as its env var would be; over env and file, under the named flags above).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
}

/// `--set KEY=VALUE`: a dotted key and its value (checked against the keys by `config`).
fn parse_set(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE with a dotted key like limits.frame_bytes_max, got {text:?}")),
    }
}

/// Flags of `ether token`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TokenArgs {
    /// User id, the token's `sub`.
    #[arg(long, value_name = "U")]
    pub user: String,
    /// Lifetime: `30s`, `15m`, `1h`, `7d`, `1h30m` or plain seconds.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Device id to put in the token (optional).
    #[arg(long, value_name = "D")]
    pub device: Option<String>,
    /// Configuration file to find the secret in (else `ETHER_CONFIG`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory to find `secrets.toml` in.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// Flags of `ether admin`; all global so they may come before or after the subcommand.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AdminArgs {
    /// Admin address (else `ETHER_ADMIN_ADDR`, else `<data>/ports.json`, else `listen.admin`).
    #[arg(long, value_name = "HOST:PORT", global = true)]
    pub addr: Option<String>,
    /// Admin bearer token (else `ETHER_AUTH_ADMIN_TOKEN`, else the local config/secrets).
    #[arg(long, value_name = "T", global = true)]
    pub token: Option<String>,
    /// PEM certificate(s) to trust for an `https://` admin address (`listen.admin_tls`), e.g.
    /// a private CA; default: the Mozilla roots.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    pub json: bool,
    /// Configuration file of the local node.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory of the local node.
    #[arg(long, value_name = "DIR", global = true)]
    pub data: Option<PathBuf>,
    /// The admin call to make.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The admin calls.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AdminCommand {
    /// Node, shard and storage statistics.
    Stats,
    /// Live connections and recent closes.
    Connections,
    /// Live connections of one user.
    User {
        /// User id.
        uid: String,
    },
    /// Disconnect a user's terminals (all, or one device).
    Kick {
        /// User id.
        uid: String,
        /// Only this device.
        #[arg(long, value_name = "D")]
        device: Option<String>,
        /// Also refuse the tokens issued up to now (of this device only, with --device), so
        /// the terminals cannot come back with the token they hold.
        #[arg(long)]
        revoke: bool,
    },
    /// Stop accepting, tell terminals to reconnect elsewhere, close.
    Drain,
}

impl TokenArgs {
    /// The serve flags that locate this command's configuration (`--config`, `--data`).
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs { config: self.config.clone(), data: self.data.clone(), ..ServeArgs::default() }
    }
}

impl AdminArgs {
    /// The serve flags that locate this command's configuration (`--config`, `--data`).
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs { config: self.config.clone(), data: self.data.clone(), ..ServeArgs::default() }
    }
}

/// Parses `500ms`, `30s`, `15m`, `1h`, `7d`, `2w`, sequences like `1h30m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = text.parse().map_err(|_| format!("duration {text:?} is too large"))?;
        return Ok(Duration::from_secs(secs));
    }
    // Each part is a number then a unit; a short input has few parts, and the loop ends
    // because every iteration consumes at least one digit.
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number at {rest:?}"));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            "" => return Err(format!("invalid duration {text:?}: missing unit after {number}")),
            other => return Err(format!("invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h, d, w)")),
        };
        let part = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        total_ms = total_ms.checked_add(part).ok_or_else(|| format!("duration {text:?} is too large"))?;
        rest = tail;
    }
    Ok(Duration::from_millis(total_ms))
}

/// `--ttl`: a humane duration above zero and at most [`TOKEN_TTL_MAX`].
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl.is_zero() {
        return Err("ttl must be above zero".to_string());
    }
    if ttl > TOKEN_TTL_MAX {
        return Err(format!("ttl must be at most {}d", TOKEN_TTL_MAX.as_secs() / 86_400));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ether").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn duration_units() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("30s"), Ok(s(30)));
        assert_eq!(parse_duration("15m"), Ok(s(900)));
        assert_eq!(parse_duration("1h"), Ok(s(3600)));
        assert_eq!(parse_duration("7d"), Ok(s(7 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(s(14 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(s(90)));
        assert_eq!(parse_duration(" 45 "), Ok(s(45)));
        assert_eq!(parse_duration("0"), Ok(s(0)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(s(5400)));
        assert_eq!(parse_duration("1d2h3m4s5ms"), Ok(Duration::from_millis(93_784_005)));
    }

    #[test]
    fn duration_rejects() {
        for bad in ["", "  ", "h", "1x", "1hh", "-5s", "1.5h", "1 h", "s30", "1h 30m", "10y"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
        let err = parse_duration("5q").unwrap_err();
        assert!(err.contains("unknown unit \"q\""), "{err}");
        assert!(parse_duration("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_duration("18446744073709551615d").unwrap_err().contains("too large"));
        assert!(parse_duration("18446744073709551s18446744073709551s").is_err());
    }

    #[test]
    fn serve_flags() {
        let cli = parse(&[
            "serve",
            "--shards",
            "4",
            "--data",
            "/var/lib/ether",
            "--redis",
            "redis://r:6379",
            "--node-id",
            "n7",
            "--listen-client",
            "0.0.0.0:9100",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.shards, Some(4));
        assert_eq!(args.data, Some(PathBuf::from("/var/lib/ether")));
        assert_eq!(args.redis.as_deref(), Some("redis://r:6379"));
        assert_eq!(args.node_id.as_deref(), Some("n7"));
        assert_eq!(args.listen_client, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(args.listen_api, None);
        assert_eq!(args.log_format.as_deref(), Some("json"));
        assert_eq!(args.config, None);

        let Command::Serve(empty) = parse(&["serve"]).unwrap().command else { panic!() };
        assert_eq!(*empty, ServeArgs::default());

        assert!(parse(&["serve", "--log-format", "xml"]).is_err());
        assert!(parse(&["serve", "--listen-api", "localhost"]).is_err());
        assert!(parse(&["serve", "--shards", "many"]).is_err());
    }

    #[test]
    fn set_flags_repeat_and_keep_the_value_whole() {
        let Command::Serve(s) =
            parse(&["serve", "--set", "limits.frame_bytes_max=1024", "--set", "events.webhook_url=http://h/x?a=b"])
                .unwrap()
                .command
        else {
            panic!("not serve")
        };
        let want = [("limits.frame_bytes_max", "1024"), ("events.webhook_url", "http://h/x?a=b")];
        assert_eq!(s.set, want.map(|(k, v)| (k.to_owned(), v.to_owned())));
        assert!(parse(&["serve", "--set", "no-equals"]).is_err());
        assert!(parse(&["serve", "--set", "=value"]).is_err());
    }

    #[test]
    fn token_flags() {
        let Command::Token(t) = parse(&["token", "--user", "alice"]).unwrap().command else { panic!() };
        assert_eq!(t.ttl, Duration::from_secs(3600), "default ttl is 1h");
        assert_eq!(t.user, "alice");
        assert_eq!(t.device, None);

        let Command::Token(t) =
            parse(&["token", "--user", "bob", "--ttl", "7d", "--device", "phone", "--data", "d"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(t.ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(t.device.as_deref(), Some("phone"));
        assert_eq!(t.serve_args().data, Some(PathBuf::from("d")));

        assert!(parse(&["token"]).is_err(), "--user is required");
        assert!(parse(&["token", "--user", "a", "--ttl", "0"]).is_err());
        assert!(parse(&["token", "--user", "a", "--ttl", "400d"]).is_err());
        // What the command line takes, the node mints: the longest ttl of one is the other's.
        let Command::Token(longest) = parse(&["token", "--user", "a", "--ttl", "365d"]).unwrap().command else {
            panic!("not token")
        };
        let keys = crate::auth::TokenKeys::new("0123456789abcdef0123456789abcdef");
        assert!(keys.mint("a", longest.ttl, None).is_ok(), "365d is taken and minted");
        assert!(parse(&["token", "--user", "a", "--ttl", "366d"]).is_err(), "more is refused at parse time");
    }

    #[test]
    fn admin_flags_anywhere() {
        let Command::Admin(a) =
            parse(&["admin", "--addr", "h:9002", "kick", "bob", "--device", "web", "--json"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(a.addr.as_deref(), Some("h:9002"));
        assert!(a.json);
        assert_eq!(a.command, AdminCommand::Kick { uid: "bob".into(), device: Some("web".into()), revoke: false });

        let Command::Admin(a) = parse(&["admin", "stats", "--token", "t0ken", "--config", "e.toml"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(a.command, AdminCommand::Stats);
        assert_eq!(a.token.as_deref(), Some("t0ken"));
        assert!(!a.json);
        assert_eq!(a.serve_args().config, Some(PathBuf::from("e.toml")));

        for (args, want) in [
            (&["admin", "connections"][..], AdminCommand::Connections),
            (&["admin", "drain"][..], AdminCommand::Drain),
            (&["admin", "user", "u1"][..], AdminCommand::User { uid: "u1".into() }),
        ] {
            let Command::Admin(a) = parse(args).unwrap().command else { panic!() };
            assert_eq!(a.command, want);
        }
        assert!(parse(&["admin"]).is_err(), "a subcommand is required");
        assert!(parse(&["admin", "user"]).is_err(), "user needs a uid");
    }
}
