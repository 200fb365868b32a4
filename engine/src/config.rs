//! Configuration: raw layers (default < file < env < flags) validated once into a typed `Config`;
//! owns key names, defaults and limits, and must not open sockets, start threads or touch the store.
//!
//! Every key `section.key` of the TOML file is also the env var `ETHER_SECTION_KEY` (an empty
//! value counts as unset); some have a `serve` flag (see [`FLAGS`]). Errors name the key and
//! where its value came from, e.g. `node.shards (from env ETHER_NODE_SHARDS): must be 1..=256`.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::cli::{AdminArgs, ServeArgs, TokenArgs};
use crate::secrets::{validate_secret, AuthSecrets, DataFileError, PortsFile, Secret, Secrets};

/// Env var naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "ETHER_CONFIG";
/// Env var giving `ether admin` its default `--addr`.
pub const ADMIN_ADDR_ENV: &str = "ETHER_ADMIN_ADDR";
/// Prefix of every env var we read.
pub const ENV_PREFIX: &str = "ETHER_";
/// `ETHER_*` variables that are not configuration keys but are read on purpose: the node's
/// experiment knobs (`node.rs`) and the repository's tools (SDK example, load test, tests), so
/// [`env_warnings`] does not call them typos.
pub const OTHER_ENV_VARS: &[&str] = &[
    CONFIG_ENV,
    ADMIN_ADDR_ENV,
    "ETHER_RING_DEPTH",
    "ETHER_API_QUEUE_LATENCY_MS",
    "ETHER_TIME_SLICE_MS",
    "ETHER_SPIN_US",
    "ETHER_TOKEN",
    "ETHER_WS",
    "ETHER_BIN",
    "ETHER_REDIS_SERVER",
    "ETHER_DASHBOARD_WINDOW",
    "ETHER_STORE_CRASH_DIR",
];
/// `serve` flags and the key each one sets.
pub const FLAGS: &[(&str, &str)] = &[
    ("listen.client", "--listen-client"),
    ("listen.api", "--listen-api"),
    ("listen.admin", "--listen-admin"),
    ("listen.client_tls", "--listen-client-tls"),
    ("listen.api_tls", "--listen-api-tls"),
    ("listen.admin_tls", "--listen-admin-tls"),
    ("tls.cert_path", "--tls-cert"),
    ("tls.key_path", "--tls-key"),
    ("node.shards", "--shards"),
    ("node.data_dir", "--data"),
    ("node.id", "--node-id"),
    ("cluster.redis_url", "--redis"),
    ("log.format", "--log-format"),
    ("log.level", "--log-level"),
];
/// Default `tls.reload_check_s`.
const TLS_RELOAD_CHECK_S_DEFAULT: u64 = 10;
/// Largest config file we agree to read.
const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Most shard threads a node may run.
pub const SHARDS_MAX: usize = 256;
/// Longest URL accepted for `cluster.redis_url` and `events.webhook_url`.
const URL_BYTES_MAX: usize = 2048;
/// Longest node id.
const NODE_ID_BYTES_MAX: usize = 64;
/// Shortest `node.sched_slice_us` other than 0: the kernel raises shorter slices to this.
const SCHED_SLICE_US_MIN: u64 = 100;
/// Longest `log.level` filter.
const LOG_LEVEL_BYTES_MAX: usize = 1024;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// The process environment, for [`Config::load`] outside tests.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// The env var of a dotted key: `listen.client` → `ETHER_LISTEN_CLIENT`.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

// ---------------------------------------------------------------------------------------------
// Raw layer: what one source said, every key optional.

/// A value an env var can hold: how to parse it and what to say when it does not parse.
trait EnvValue: Sized {
    const EXPECTED: &'static str;
    fn parse_env(text: &str) -> Option<Self>;
}

impl EnvValue for String {
    const EXPECTED: &'static str = "a string";
    fn parse_env(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

impl EnvValue for PathBuf {
    const EXPECTED: &'static str = "a path";
    fn parse_env(text: &str) -> Option<Self> {
        Some(PathBuf::from(text))
    }
}

impl EnvValue for Secret {
    const EXPECTED: &'static str = "a secret";
    fn parse_env(text: &str) -> Option<Self> {
        Some(Secret::new(text))
    }
}

impl EnvValue for bool {
    const EXPECTED: &'static str = "true or false";
    fn parse_env(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        }
    }
}

macro_rules! env_integer {
    ($($ty:ty),*) => {$(
        impl EnvValue for $ty {
            const EXPECTED: &'static str = "a whole number";
            fn parse_env(text: &str) -> Option<Self> {
                text.trim().parse().ok()
            }
        }
    )*};
}
env_integer!(u32, u64, usize);

/// What a key's value must be, for a value that does not even parse: an integer key names
/// its range (from [`LIMIT_BOUNDS`]), so `5000000000` or `-1` is answered with it.
fn expected(key: &str, of_type: &'static str) -> String {
    match LIMIT_BOUNDS.iter().find(|(k, _, _)| *k == key) {
        Some((_, min, max)) => format!("an integer in {min}..={max}"),
        None => of_type.to_owned(),
    }
}

fn env_value<T: EnvValue>(lookup: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<T>, ConfigError> {
    let var = env_var(key);
    match lookup(&var) {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => match T::parse_env(&text) {
            Some(value) => Ok(Some(value)),
            None => Err(ConfigError::Env { var, expected: expected(key, T::EXPECTED), got: text }),
        },
    }
}

/// Declares the raw sections once; generates the structs, overlay, env reading and key lists.
macro_rules! raw_config {
    ($(
        $(#[$section_doc:meta])*
        $section:ident: $Section:ident {
            $( $(#[$key_doc:meta])* $key:ident: $ty:ty, )*
        }
    )*) => {
        $(
            $(#[$section_doc])*
            #[derive(Debug, Clone, Default, Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $Section {
                $( $(#[$key_doc])* pub $key: Option<$ty>, )*
            }

            impl $Section {
                const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

                fn overlay(self, other: $Section) -> $Section {
                    $Section { $( $key: other.$key.or(self.$key), )* }
                }

                fn from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<$Section, ConfigError> {
                    Ok($Section {
                        $( $key: env_value(lookup, concat!(stringify!($section), ".", stringify!($key)))?, )*
                    })
                }

                fn is_set(&self, key: &str) -> bool {
                    match key {
                        $( stringify!($key) => self.$key.is_some(), )*
                        _ => false,
                    }
                }

                fn check_toml(key: &str, value: &toml::Value) -> Option<Result<(), String>> {
                    match key {
                        $( stringify!($key) => Some(
                            value.clone().try_into::<$ty>().map(drop).map_err(|e| e.message().to_owned())
                        ), )*
                        _ => None,
                    }
                }
            }
        )*

        /// What one source (file, env, flags) says; every key optional, unknown TOML keys rejected.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawConfig {
            $(
                #[doc = concat!("The `[", stringify!($section), "]` section.")]
                #[serde(default)]
                pub $section: $Section,
            )*
        }

        impl RawConfig {
            /// Every key, dotted (`listen.client`, …), in declaration order.
            pub const KEYS: &'static [&'static str] = &[
                $( $( concat!(stringify!($section), ".", stringify!($key)), )* )*
            ];
            const SECTIONS: &'static [&'static str] = &[$(stringify!($section)),*];

            /// `self` with every key `other` sets replaced by `other`'s value.
            pub fn overlay(self, other: RawConfig) -> RawConfig {
                RawConfig { $( $section: self.$section.overlay(other.$section), )* }
            }

            fn from_env_dyn(lookup: &dyn Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
                Ok(RawConfig { $( $section: $Section::from_env(lookup)?, )* })
            }

            /// Whether this source sets the dotted `key`.
            pub fn is_set(&self, key: &str) -> bool {
                let Some((section, key)) = key.split_once('.') else { return false };
                match section {
                    $( stringify!($section) => self.$section.is_set(key), )*
                    _ => false,
                }
            }

            fn section_keys(section: &str) -> Option<&'static [&'static str]> {
                match section {
                    $( stringify!($section) => Some($Section::KEYS), )*
                    _ => None,
                }
            }

            fn check_toml(section: &str, key: &str, value: &toml::Value) -> Option<Result<(), String>> {
                match section {
                    $( stringify!($section) => $Section::check_toml(key, value), )*
                    _ => None,
                }
            }
        }
    };
}

raw_config! {
    /// Raw `[listen]`: listener socket addresses.
    listen: RawListen {
        /// `listen.client`: terminal WebSocket listener.
        client: String,
        /// `listen.api`: business REST listener.
        api: String,
        /// `listen.admin`: admin/metrics listener.
        admin: String,
        /// `listen.client_tls`: terminal WebSocket listener over TLS (`wss://`); unset: none.
        client_tls: String,
        /// `listen.api_tls`: business REST listener over TLS (`https://`); unset: none.
        api_tls: String,
        /// `listen.admin_tls`: admin/metrics listener over TLS (`https://`); unset: none.
        admin_tls: String,
    }
    /// Raw `[tls]`: the certificate of the `listen.client_tls` and `listen.api_tls` listeners.
    tls: RawTls {
        /// `tls.cert_path`: PEM certificate chain, leaf first.
        cert_path: PathBuf,
        /// `tls.key_path`: PEM private key (PKCS#8, PKCS#1 or SEC1).
        key_path: PathBuf,
        /// `tls.reload_check_s`: how often the files are checked for a renewed pair (0: never).
        reload_check_s: u64,
    }
    /// Raw `[node]`: this process.
    node: RawNode {
        /// `node.shards`: shard threads.
        shards: usize,
        /// `node.data_dir`: store, secrets, ports.json.
        data_dir: PathBuf,
        /// `node.id`: node id (alias `cluster.node_id`).
        id: String,
        /// `node.sched_slice_us`: the scheduler time slice the node's threads ask for.
        sched_slice_us: u64,
    }
    /// Raw `[auth]`: secrets; missing ones come from `<data_dir>/secrets.toml`.
    auth: RawAuth {
        /// `auth.jwt_secret`: HS256 key for terminal tokens.
        jwt_secret: Secret,
        /// `auth.api_key`: business API bearer key.
        api_key: Secret,
        /// `auth.admin_token`: admin bearer token.
        admin_token: Secret,
    }
    /// Raw `[cluster]`: cluster mode.
    cluster: RawCluster {
        /// `cluster.redis_url`: Redis URL; set means cluster mode.
        redis_url: String,
        /// `cluster.node_id`: alias of `node.id`.
        node_id: String,
    }
    /// Raw `[events]`: webhook delivery.
    events: RawEvents {
        /// `events.webhook_url`: where event batches are POSTed.
        webhook_url: String,
        /// `events.webhook_secret`: HMAC-SHA256 key of `X-Ether-Signature`.
        webhook_secret: Secret,
        /// `events.webhook_ca_path`: PEM roots for an `https://` webhook (default: Mozilla's).
        webhook_ca_path: PathBuf,
        /// `events.batch_wait_ms`: how long a shard gathers events before one outbox write.
        batch_wait_ms: u64,
        /// `events.group_unreached_members_max`: `group.unreached` for groups up to this size.
        group_unreached_members_max: usize,
        /// `events.outbox_max`: events the durable outbox keeps at most (past it the oldest go).
        outbox_max: u64,
    }
    /// Raw `[retention]`: how long messages are kept.
    retention: RawRetention {
        /// `retention.days`: days messages are kept.
        days: u32,
    }
    /// Raw `[limits]`: every bound of the node; units are in the names.
    limits: RawLimits {
        /// `limits.frame_bytes_max`: largest terminal WebSocket message.
        frame_bytes_max: usize,
        /// `limits.terminals_per_user_max`: live connections per user.
        terminals_per_user_max: usize,
        /// `limits.outbound_queue_bytes_max`: unsent bytes per connection before it is closed.
        outbound_queue_bytes_max: usize,
        /// `limits.connections_per_shard_max`: terminal connections per shard.
        connections_per_shard_max: usize,
        /// `limits.handshake_timeout_ms`: time from accept to a completed upgrade.
        handshake_timeout_ms: u64,
        /// `limits.idle_timeout_s`: silence after which a terminal is dropped.
        idle_timeout_s: u64,
        /// `limits.heartbeat_s`: heartbeat interval announced to terminals.
        heartbeat_s: u64,
        /// `limits.http_header_bytes_max`: request line plus headers, any port.
        http_header_bytes_max: usize,
        /// `limits.http_body_bytes_max`: request body on the API and admin ports.
        http_body_bytes_max: usize,
        /// `limits.api_connections_max`: concurrent API port connections.
        api_connections_max: usize,
        /// `limits.protocol_violations_max`: bad frames tolerated before a terminal is closed.
        protocol_violations_max: u32,
        /// `limits.sync_page_max`: messages per `sync` answer page.
        sync_page_max: usize,
        /// `limits.resend_timeout_ms`: an unacknowledged message (inbox or group) is pushed
        /// again after this (checked on the shards' 250 ms tick: at least 250, and counted in
        /// whole ticks, rounded down).
        resend_timeout_ms: u64,
        /// `limits.resend_attempts_max`: pushes again before leaving it to `sync` (per message
        /// for the inbox, per ack position for a group).
        resend_attempts_max: u32,
        /// `limits.unacked_per_terminal_max`: unacknowledged messages tracked per terminal.
        unacked_per_terminal_max: usize,
        /// `limits.events_pending_max`: events a shard holds for the outbox at most.
        events_pending_max: usize,
        /// `limits.drain_window_ms`: time a drain takes to close every terminal.
        drain_window_ms: u64,
        /// `limits.group_members_max`: members one group may have.
        group_members_max: usize,
        /// `limits.groups_per_user_max`: groups one user may be a member of.
        groups_per_user_max: usize,
        /// `limits.socket_send_buffer_bytes`: kernel send buffer per terminal socket (0: the kernel's).
        socket_send_buffer_bytes: usize,
        /// `limits.park_idle_after_ms`: time without I/O after which a terminal's connection is
        /// parked out of its task (0: never).
        park_idle_after_ms: u64,
        /// `limits.terminal_sends_per_s`: `send` frames per second per terminal (0: no limit).
        terminal_sends_per_s: u32,
        /// `limits.terminal_sends_burst`: `send` frames at once after a quiet spell.
        terminal_sends_burst: u32,
        /// `limits.terminal_requests_per_s`: `sync` and `read` frames per second per terminal
        /// (0: no limit).
        terminal_requests_per_s: u32,
        /// `limits.terminal_requests_burst`: `sync` and `read` frames at once.
        terminal_requests_burst: u32,
        /// `limits.api_requests_per_s`: API requests per second for the whole node (0: no limit).
        api_requests_per_s: u32,
        /// `limits.api_requests_burst`: API requests at once for the whole node.
        api_requests_burst: u32,
        /// `limits.tls_handshakes_per_shard_max`: TLS handshakes in progress per shard.
        tls_handshakes_per_shard_max: usize,
        /// `limits.handshakes_per_shard_max`: WebSocket handshakes in progress per shard.
        handshakes_per_shard_max: usize,
    }
    /// Raw `[terminal]`: what terminals may do.
    terminal: RawTerminal {
        /// `terminal.send_enabled`: terminals may `send` messages themselves.
        send_enabled: bool,
    }
    /// Raw `[store]`: the embedded message store.
    store: RawStore {
        /// `store.durability`: `normal` (survives a crash) or `full` (survives power loss).
        durability: String,
        /// `store.index_flush_age_ms`: how long inbox positions may stay only in memory.
        index_flush_age_ms: u64,
        /// `store.index_pending_max`: inbox positions held in memory before they are written.
        index_pending_max: usize,
        /// `store.batch_wait_us`: how long a storage batch waits for more commands.
        batch_wait_us: u64,
        /// `store.batch_wait_after_ops`: a batch waits only after one at least this big.
        batch_wait_after_ops: usize,
        /// `store.queue_bytes_max`: payload bytes queued for the storage thread at most.
        queue_bytes_max: usize,
        /// `store.position_saves_per_tick_max`: terminal ack positions saved per shard tick.
        position_saves_per_tick_max: usize,
    }
    /// Raw `[log]`: logging.
    log: RawLog {
        /// `log.format`: `human` or `json`.
        format: String,
        /// `log.level`: filter such as `info` or `info,ether_engine=debug`.
        level: String,
    }
}

impl RawConfig {
    /// Reads a TOML file; unknown sections and keys are errors naming the dotted key.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let read_error = |source| ConfigError::ReadFile { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(CONFIG_FILE_BYTES_MAX + 1).read_to_string(&mut text).map_err(read_error)?;
        if text.len() as u64 > CONFIG_FILE_BYTES_MAX {
            let message = format!("larger than {CONFIG_FILE_BYTES_MAX} bytes");
            return Err(ConfigError::ParseFile { path: path.to_path_buf(), message });
        }
        RawConfig::from_toml(&text).map_err(|message| ConfigError::ParseFile { path: path.to_path_buf(), message })
    }

    /// Parses TOML text; the error names the dotted key when there is one.
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| describe_toml_error(text, &e))
    }

    /// Reads every `ETHER_<SECTION>_<KEY>` through `lookup`; a value that does not parse is an
    /// error naming the variable, an empty value counts as unset.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
        RawConfig::from_env_dyn(&lookup)
    }

    /// The keys `--set KEY=VALUE` flags set, each value read as its env var would be; an
    /// unknown key or a value that does not parse is refused, naming the flag.
    pub fn from_set_flags(set: &[(String, String)]) -> Result<RawConfig, ConfigError> {
        for (key, _) in set {
            if !RawConfig::KEYS.contains(&key.as_str()) {
                let hint = match did_you_mean(key, RawConfig::KEYS) {
                    hint if hint.is_empty() => " (keys look like limits.frame_bytes_max)".to_owned(),
                    hint => hint,
                };
                return Err(ConfigError::UnknownSetKey { key: key.clone(), hint });
            }
        }
        let by_var: std::collections::HashMap<String, String> =
            set.iter().map(|(k, v)| (env_var(k), v.clone())).collect();
        RawConfig::from_env_dyn(&|var| by_var.get(var).cloned()).map_err(|e| match e {
            ConfigError::Env { var, expected, got } => {
                let key = set.iter().find(|(k, _)| env_var(k) == var).map_or(var, |(k, _)| k.clone());
                ConfigError::Env { var: format!("--set {key}"), expected, got }
            }
            other => other,
        })
    }

    /// The keys `ether serve` flags set (see [`FLAGS`]); `--config` is not a key.
    pub fn from_serve_args(args: &ServeArgs) -> RawConfig {
        let mut raw = RawConfig::default();
        raw.listen.client = args.listen_client.map(|a| a.to_string());
        raw.listen.api = args.listen_api.map(|a| a.to_string());
        raw.listen.admin = args.listen_admin.map(|a| a.to_string());
        raw.listen.client_tls = args.listen_client_tls.map(|a| a.to_string());
        raw.listen.api_tls = args.listen_api_tls.map(|a| a.to_string());
        raw.listen.admin_tls = args.listen_admin_tls.map(|a| a.to_string());
        raw.tls.cert_path = args.tls_cert.clone();
        raw.tls.key_path = args.tls_key.clone();
        raw.node.shards = args.shards;
        raw.node.data_dir = args.data.clone();
        raw.node.id = args.node_id.clone();
        raw.cluster.redis_url = args.redis.clone();
        raw.log.format = args.log_format.clone();
        raw.log.level = args.log_level.clone();
        raw
    }

    /// The `ETHER_*` names among `names` that this version does not read (likely typos).
    pub fn unknown_env_vars<I, S>(names: I) -> Vec<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        names
            .into_iter()
            .map(|n| n.as_ref().to_owned())
            .filter(|n| n.starts_with(ENV_PREFIX))
            .filter(|n| !OTHER_ENV_VARS.contains(&n.as_str()))
            .filter(|n| !RawConfig::KEYS.iter().any(|k| env_var(k) == *n))
            .collect()
    }
}

/// One warning per `ETHER_*` variable among `names` that no command reads (a typo such as
/// `ETHER_NODE_SHARD` would otherwise be ignored without a word), with the closest real name.
pub fn env_warnings<I, S>(names: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let known: Vec<String> = RawConfig::KEYS.iter().map(|k| env_var(k)).collect();
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let mut unknown = RawConfig::unknown_env_vars(names);
    unknown.sort();
    unknown
        .into_iter()
        .map(|var| {
            // `ETHER_LOG` was once read as the log filter; `ETHER_LOG_LEVEL` is `log.level`.
            let hint = if var == "ETHER_LOG" {
                " (did you mean `ETHER_LOG_LEVEL`?)".to_owned()
            } else {
                did_you_mean(&var, &known)
            };
            format!("{var} is not a configuration variable and is ignored{hint}")
        })
        .collect()
}

/// Finds which dotted key a TOML error is about (our own walk over the table); falls back to
/// the parser's message, which shows the line, for syntax errors.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let Ok(table) = text.parse::<toml::Table>() else {
        return error.to_string().trim_end().to_owned();
    };
    for (section, value) in &table {
        let Some(keys) = RawConfig::section_keys(section) else {
            return format!(
                "{section}: unknown section; sections are {}{}",
                RawConfig::SECTIONS.join(", "),
                did_you_mean(section, RawConfig::SECTIONS)
            );
        };
        let Some(entries) = value.as_table() else {
            return format!("{section}: expected a table [{section}], got a {}", value.type_str());
        };
        for (key, value) in entries {
            match RawConfig::check_toml(section, key, value) {
                None => {
                    return format!(
                        "{section}.{key}: unknown key; [{section}] has {}{}",
                        keys.join(", "),
                        did_you_mean(key, keys)
                    )
                }
                Some(Err(problem)) => {
                    let dotted = format!("{section}.{key}");
                    return match LIMIT_BOUNDS.iter().find(|(k, _, _)| *k == dotted) {
                        Some((_, min, max)) => format!("{dotted}: expected an integer in {min}..={max}, got {value}"),
                        None => format!("{dotted}: {problem}"),
                    };
                }
                Some(Ok(())) => {}
            }
        }
    }
    error.to_string().trim_end().to_owned()
}

/// `" (did you mean `x`?)"` for the closest candidate within a small edit distance.
fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Where a value came from.

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Nobody set it: the built-in default.
    Default,
    /// The TOML file at this path.
    File(PathBuf),
    /// This env var.
    Env(String),
    /// This `serve` flag.
    Flag(&'static str),
    /// Set in code, e.g. `Config::test_min`.
    Code(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Code(name) => f.write_str(name),
        }
    }
}

enum LayerKind {
    File(PathBuf),
    Env,
    /// `--set KEY=VALUE` flags.
    Set,
    Flags,
    Code(&'static str),
}

struct Layer {
    kind: LayerKind,
    raw: RawConfig,
}

impl Layer {
    fn source_of(&self, key: &str) -> Source {
        match &self.kind {
            LayerKind::File(path) => Source::File(path.clone()),
            LayerKind::Env => Source::Env(env_var(key)),
            LayerKind::Set => Source::Flag("--set"),
            LayerKind::Flags => Source::Flag(FLAGS.iter().find(|(k, _)| *k == key).map_or("(flag)", |(_, flag)| *flag)),
            LayerKind::Code(name) => Source::Code(name),
        }
    }
}

/// The sources in increasing precedence.
struct Layers(Vec<Layer>);

impl Layers {
    /// file (from `--config`, else `ETHER_CONFIG`) < env < flags.
    fn gather(args: &ServeArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Layers, ConfigError> {
        let mut layers = Vec::with_capacity(3);
        let file = args.config.clone().or_else(|| env(CONFIG_ENV).filter(|p| !p.is_empty()).map(PathBuf::from));
        if let Some(path) = file {
            let raw = RawConfig::from_file(&path)?;
            warn_if_secrets_exposed(&path, &raw);
            layers.push(Layer { kind: LayerKind::File(path), raw });
        }
        layers.push(Layer { kind: LayerKind::Env, raw: RawConfig::from_env_dyn(env)? });
        if !args.set.is_empty() {
            layers.push(Layer { kind: LayerKind::Set, raw: RawConfig::from_set_flags(&args.set)? });
        }
        layers.push(Layer { kind: LayerKind::Flags, raw: RawConfig::from_serve_args(args) });
        Ok(Layers(layers))
    }

    fn merged(&self) -> RawConfig {
        self.0.iter().fold(RawConfig::default(), |acc, layer| acc.overlay(layer.raw.clone()))
    }

    /// The source whose value of `key` won.
    fn origin(&self, key: &str) -> Source {
        self.0.iter().rev().find(|layer| layer.raw.is_set(key)).map_or(Source::Default, |layer| layer.source_of(key))
    }
}

/// Warns when the config file holds a secret (`auth.*`, `events.webhook_secret`) and other
/// users may read it, as `secrets.toml` is checked.
fn warn_if_secrets_exposed(path: &Path, raw: &RawConfig) {
    use std::os::unix::fs::PermissionsExt;
    let secrets = ["auth.jwt_secret", "auth.api_key", "auth.admin_token", "events.webhook_secret"];
    let held: Vec<&str> = secrets.into_iter().filter(|k| raw.is_set(k)).collect();
    if held.is_empty() {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                secrets = %held.join(", "),
                "config file holds secrets and is readable by others; run chmod 600 on it"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why the configuration was refused; every message names the key or variable and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {}: cannot read: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {}: {message}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, starting with the dotted key when there is one.
        message: String,
    },
    /// `--set` names a key this version does not have.
    #[error("--set {key}: no such configuration key{hint}")]
    UnknownSetKey {
        /// The key as given.
        key: String,
        /// ` (did you mean …?)` with the closest key, else an example of one.
        hint: String,
    },
    /// An env var (or a `--set` value) does not parse.
    #[error("{var}: expected {expected}, got {got:?}")]
    Env {
        /// The variable.
        var: String,
        /// What it should hold.
        expected: String,
        /// What it holds.
        got: String,
    },
    /// A value parsed but is out of range or inconsistent.
    #[error("{key} (from {origin}): {message}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// Where the refused value came from.
        origin: Source,
        /// What is wrong.
        message: String,
    },
    /// A secret is neither configured nor stored (commands that do not generate secrets).
    #[error("{key}: not configured and not in {}; start `ether serve` once or set {}", path.display(), env_var(key))]
    MissingSecret {
        /// The dotted key.
        key: &'static str,
        /// The secrets file looked at.
        path: PathBuf,
    },
    /// `secrets.toml` or `ports.json` could not be read or written.
    #[error(transparent)]
    DataFile(#[from] DataFileError),
}

// ---------------------------------------------------------------------------------------------
// Validated configuration.

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The config spelling: `human` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// Listener addresses (port 0 = any free port; see `PortsFile` for the bound ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// Terminal WebSocket listener (default 0.0.0.0:9000).
    pub client: SocketAddr,
    /// Business REST listener (default 127.0.0.1:9001).
    pub api: SocketAddr,
    /// Admin/metrics listener (default 127.0.0.1:9002).
    pub admin: SocketAddr,
    /// Terminal WebSocket listener over TLS (`wss://`), when configured (with [`Tls`]).
    pub client_tls: Option<SocketAddr>,
    /// Business REST listener over TLS (`https://`), when configured (with [`Tls`]).
    pub api_tls: Option<SocketAddr>,
    /// Admin/metrics listener over TLS (`https://`), when configured (with [`Tls`]).
    pub admin_tls: Option<SocketAddr>,
}

/// The certificate and key of the `listen.client_tls` listener (PEM files, read at start and
/// again when they change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// How often the files are checked for a renewed pair (`tls.reload_check_s`, default
    /// 10 s; zero: never).
    pub reload_check: Duration,
}

/// This process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Shard threads, 1..=256 (default: online CPUs).
    pub shards: usize,
    /// Store, secrets.toml and ports.json (default ./ether-data).
    pub data_dir: PathBuf,
    /// Node id in the cluster (default: the host name, else `node-1`).
    pub id: String,
    /// `node.sched_slice_us` (100): the time slice every thread of the node asks the Linux
    /// scheduler for (`sched_setattr`, EEVDF's custom slice, Linux 6.12+; the kernel keeps it
    /// within 100 µs..100 ms, so 1..=99 is refused rather than raised unseen). A short slice gives a thread woken with work an early
    /// deadline, so it runs soon after the wake instead of waiting out another thread's
    /// slice. 0 leaves the kernel's default (about 3 ms).
    pub sched_slice: Duration,
}

/// Cluster membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Redis URL; `Some` means cluster mode, `None` standalone with SQLite.
    pub redis_url: Option<String>,
}

/// Event delivery to business systems.
#[derive(Debug, Clone)]
pub struct Events {
    /// Where to POST event batches, if anywhere.
    pub webhook: Option<Webhook>,
    /// `events.batch_wait_ms` (10): a shard gathers the events it makes for this long and
    /// writes them to the outbox in one store command (at most
    /// [`crate::event_batch::EVENTS_PER_WRITE_MAX`] at a time). Longer: fewer store writes per
    /// event (one Redis call per batch in cluster mode), later webhook deliveries. 0 writes
    /// each event at once.
    pub batch_wait: Duration,
    /// `events.group_unreached_members_max` (1000): a message posted to a group of at most
    /// this many members makes one `group.unreached` event naming the members with no
    /// terminal online (the hook for mobile push to a group); larger groups make none (the
    /// business lists their members itself). 0: never. A check costs a member list read and a
    /// presence check per member (a Redis lookup each in cluster mode); a busy group's
    /// messages share one (`messages` in the event). Measured in cluster mode (2 nodes, one
    /// hot group of 500 online members, session 12): 687k / 716k deliveries/s with it,
    /// 759k / 858k without.
    pub group_unreached_members_max: usize,
    /// `events.outbox_max` (1,000,000): events the durable outbox keeps at most. While the
    /// webhook is down the outbox grows; past this a write deletes the oldest events first
    /// (the newest are the most useful) and counts them (`ether_outbox_dropped_total`, a
    /// warning at most once a minute or per power of two), so the disk (standalone) or the
    /// Redis that also holds the messages (cluster) is not filled. Events are at-least-once
    /// while within it. A few hundred bytes per event: 1,000,000 is some hundreds of MB.
    pub outbox_max: u64,
}

/// A webhook target and its signing key.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key of `X-Ether-Signature`.
    pub secret: Secret,
    /// PEM certificates to trust for an `https://` URL instead of the Mozilla roots (a
    /// private CA).
    pub ca_path: Option<PathBuf>,
}

/// Message retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Days messages are kept, 1..=3650 (default 30).
    pub days: u32,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Line format (default human).
    pub format: LogFormat,
    /// Filter directive (default `info`).
    pub level: String,
}

/// Every bound of the node; units are in the names. Bounds accepted are in [`LIMIT_BOUNDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest terminal WebSocket message, bytes (64 KiB; a 32 KiB custom body plus envelope).
    pub frame_bytes_max: usize,
    /// Live connections per user (10), over every node of a cluster (devices on other nodes
    /// as the user's presence lists them when the terminal's own entry is written).
    pub terminals_per_user_max: usize,
    /// Unsent bytes per connection before it is closed as slow (1 MiB; >= frame_bytes_max).
    pub outbound_queue_bytes_max: usize,
    /// Terminal connections per shard (100 000).
    pub connections_per_shard_max: usize,
    /// From accept to a completed upgrade (5 s).
    pub handshake_timeout: Duration,
    /// Silence after which a terminal is dropped (90 s; must exceed heartbeat_s).
    pub idle_timeout: Duration,
    /// Heartbeat interval announced in `welcome`, seconds (30).
    pub heartbeat_s: u64,
    /// Request line plus headers on any HTTP port, bytes (8 KiB).
    pub http_header_bytes_max: usize,
    /// Request body on the API and admin ports, bytes (4 MiB).
    pub http_body_bytes_max: usize,
    /// Concurrent connections on the API port (10 000).
    pub api_connections_max: usize,
    /// Bad frames tolerated before a terminal is closed (10).
    pub protocol_violations_max: u32,
    /// Messages per `sync` answer page (500).
    pub sync_page_max: usize,
    /// First resend of an unacknowledged message after this; doubles per attempt (3 s).
    pub resend_timeout: Duration,
    /// Resends of one message before it is left to `sync` (3).
    pub resend_attempts_max: u32,
    /// Unacknowledged messages tracked per terminal; older ones are left to `sync` (1024).
    pub unacked_per_terminal_max: usize,
    /// Events a shard holds on their way to the outbox at most (100 000): while the store
    /// cannot take them (a full disk, Redis away) they wait and are tried again; past this the
    /// oldest are dropped, counted (`ether_events_dropped_total`) and logged.
    pub events_pending_max: usize,
    /// A drain tells terminals to come back within this and closes them over it (5 s).
    pub drain_window: Duration,
    /// Members one group may have (100 000).
    pub group_members_max: usize,
    /// Groups one user may be a member of (1 000).
    pub groups_per_user_max: usize,
    /// Kernel send buffer of each terminal socket, bytes; 0 leaves the kernel's autotuning (0).
    /// Smaller bounds kernel memory per connection and finds slow consumers sooner.
    pub socket_send_buffer_bytes: usize,
    /// Time without I/O (and nothing in flight) after which a terminal's connection task ends
    /// and its socket waits in the shard's epoll set, holding only the session's memory (2 s;
    /// zero: never park). See `parking`.
    pub park_idle_after: Duration,
    /// `send` frames per second per terminal, sustained (50; 0: no limit); more are answered
    /// `error rate_limited` (with the `cid`) and not sent. See `ratelimit`.
    pub terminal_sends_per_s: u32,
    /// `send` frames a terminal may send at once after a quiet spell (100).
    pub terminal_sends_burst: u32,
    /// `sync` and `read` frames per second per terminal (20; 0: no limit).
    pub terminal_requests_per_s: u32,
    /// `sync` and `read` frames at once (50).
    pub terminal_requests_burst: u32,
    /// API requests per second for the node, one limit whichever shards serve them (0: no limit, the
    /// default: the business is trusted); more are answered 429 `rate_limited`.
    pub api_requests_per_s: u32,
    /// API requests at once for the node (1 000).
    pub api_requests_burst: u32,
    /// TLS handshakes in progress per shard (256); more connections to the TLS listener wait
    /// in its listen backlog until one ends (each handshake costs key exchange and signature
    /// CPU).
    pub tls_handshakes_per_shard_max: usize,
    /// WebSocket handshakes in progress per shard on the client listener (4096): beyond it new
    /// connections wait in the kernel's listen backlog (holding no descriptor of the node)
    /// until one ends, so clients that connect and say nothing cannot take every descriptor.
    pub handshakes_per_shard_max: usize,
}

/// Default of `store.index_flush_age_ms`.
pub const STORE_INDEX_FLUSH_AGE_MS_DEFAULT: u64 = 20_000;
/// Default of `store.index_pending_max`.
pub const STORE_INDEX_PENDING_MAX_DEFAULT: usize = 4_000_000;
/// Default of `store.batch_wait_us`: no waiting (commit what is queued; what arrives during a
/// commit forms the next batch). Interleaved runs on the 2-core machine showed no gain from
/// 2 ms in chat and a loss in unicast (bench-results/README.md); with `durability = "full"`
/// (an fsync per commit) waiting may pay.
pub const STORE_BATCH_WAIT_US_DEFAULT: u64 = 0;
/// Default of `events.batch_wait_ms`.
pub const EVENTS_BATCH_WAIT_MS_DEFAULT: u64 = 10;
/// Default of `node.sched_slice_us`. Interleaved on the 2-core KVM machine (session 12,
/// `unicast --rate 20000` and `chat`, the kernel's slice against 100 µs, 6 pairs of each
/// over two rounds): publish-to-receipt p50 1.46 / 2.89 / 2.15 / 1.63 / 2.23 / 1.80 →
/// 0.98 / 1.41 / 1.33 / 1.40 / 0.81 / 1.88 ms, p99 within the machine's spread (17.6–33.6 ms
/// either way); chat 46–63k either way (noise).
pub const NODE_SCHED_SLICE_US_DEFAULT: u64 = 100;
/// Default of `events.group_unreached_members_max`.
pub const EVENTS_GROUP_UNREACHED_MEMBERS_MAX_DEFAULT: usize = 1000;
/// Default of `events.outbox_max`.
pub const EVENTS_OUTBOX_MAX_DEFAULT: u64 = ether_store::OUTBOX_MAX_DEFAULT;
/// Default of `store.batch_wait_after_ops`.
pub const STORE_BATCH_WAIT_AFTER_OPS_DEFAULT: usize = 64;
/// Default of `store.queue_bytes_max` (256 MiB).
pub const STORE_QUEUE_BYTES_MAX_DEFAULT: usize = ether_store::QUEUE_BYTES_MAX_DEFAULT;
/// Default of `store.position_saves_per_tick_max`.
pub const STORE_POSITION_SAVES_PER_TICK_MAX_DEFAULT: usize = 256;

/// Accepted range of every integer key, `(key, min, max)`, in the key's own unit.
pub const LIMIT_BOUNDS: &[(&str, u64, u64)] = &[
    ("node.shards", 1, SHARDS_MAX as u64),
    ("node.sched_slice_us", 0, 100_000),
    ("retention.days", 1, 3650),
    // Must hold the largest body (custom, 32 KiB) in production; 1 KiB lets test_min go small.
    ("limits.frame_bytes_max", KIB as u64, (16 * MIB) as u64),
    ("limits.terminals_per_user_max", 1, 1000),
    ("limits.outbound_queue_bytes_max", KIB as u64, (1024 * MIB) as u64),
    ("limits.connections_per_shard_max", 1, 10_000_000),
    ("limits.handshake_timeout_ms", 10, 300_000),
    ("limits.idle_timeout_s", 1, 86_400),
    ("limits.heartbeat_s", 1, 3600),
    ("limits.http_header_bytes_max", KIB as u64, MIB as u64),
    ("limits.http_body_bytes_max", KIB as u64, (256 * MIB) as u64),
    ("limits.api_connections_max", 1, 1_000_000),
    ("limits.protocol_violations_max", 1, 10_000),
    ("limits.sync_page_max", 1, 10_000),
    // The resend check runs on the shard's 250 ms tick: a shorter timeout would mean 250 ms.
    ("limits.resend_timeout_ms", 250, 600_000),
    ("limits.resend_attempts_max", 0, 100),
    ("limits.unacked_per_terminal_max", 1, 1_000_000),
    ("limits.events_pending_max", 1, 100_000_000),
    ("limits.drain_window_ms", 0, 600_000),
    ("limits.group_members_max", 1, 10_000_000),
    ("limits.groups_per_user_max", 1, 1_000_000),
    ("store.index_flush_age_ms", 1, 3_600_000),
    ("store.index_pending_max", 16, 100_000_000),
    ("store.batch_wait_us", 0, 100_000),
    ("store.batch_wait_after_ops", 0, 1_000_000),
    // At least one body at its largest (64 KiB) with its ids; at most 64 GiB.
    ("store.queue_bytes_max", 128 * KIB as u64, 64 << 30),
    ("events.batch_wait_ms", 0, 10_000),
    ("events.group_unreached_members_max", 0, 100_000),
    ("events.outbox_max", 1, 1_000_000_000),
    ("store.position_saves_per_tick_max", 1, 1_000_000),
    ("limits.socket_send_buffer_bytes", 0, 64 * 1024 * 1024),
    ("limits.park_idle_after_ms", 0, 3_600_000),
    ("tls.reload_check_s", 0, 86_400),
    ("limits.terminal_sends_per_s", 0, 1_000_000),
    ("limits.terminal_sends_burst", 1, 1_000_000),
    ("limits.terminal_requests_per_s", 0, 1_000_000),
    ("limits.terminal_requests_burst", 1, 1_000_000),
    ("limits.api_requests_per_s", 0, 100_000_000),
    ("limits.api_requests_burst", 1, 100_000_000),
    ("limits.tls_handshakes_per_shard_max", 1, 1_000_000),
    ("limits.handshakes_per_shard_max", 1, 1_000_000),
];

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: 64 * KIB,
            terminals_per_user_max: 10,
            outbound_queue_bytes_max: MIB,
            connections_per_shard_max: 100_000,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            heartbeat_s: 30,
            http_header_bytes_max: 8 * KIB,
            http_body_bytes_max: 4 * MIB,
            api_connections_max: 10_000,
            protocol_violations_max: 10,
            sync_page_max: 500,
            resend_timeout: Duration::from_secs(3),
            resend_attempts_max: 3,
            unacked_per_terminal_max: 1024,
            events_pending_max: 100_000,
            drain_window: Duration::from_secs(5),
            group_members_max: 100_000,
            groups_per_user_max: 1000,
            socket_send_buffer_bytes: 0,
            park_idle_after: Duration::from_secs(2),
            terminal_sends_per_s: 50,
            terminal_sends_burst: 100,
            terminal_requests_per_s: 20,
            terminal_requests_burst: 50,
            api_requests_per_s: 0,
            api_requests_burst: 1000,
            tls_handshakes_per_shard_max: 256,
            handshakes_per_shard_max: 4096,
        }
    }
}

impl Limits {
    /// `heartbeat_s` as a `Duration`.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_s)
    }
}

/// The validated configuration a node runs with; built once at start by [`Config::load`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener addresses.
    pub listen: Listen,
    /// Shards, data dir, node id.
    pub node: Node,
    /// Auth secrets, all present (configured, stored, or generated now).
    pub auth: AuthSecrets,
    /// Cluster mode.
    pub cluster: Cluster,
    /// Event delivery.
    pub events: Events,
    /// TLS: `Some` exactly when `listen.client_tls`, `listen.api_tls` or `listen.admin_tls` is
    /// set.
    pub tls: Option<Tls>,
    /// Message retention.
    pub retention: Retention,
    /// Every bound.
    pub limits: Limits,
    /// Terminals may `send` (`terminal.send_enabled`, default true).
    pub terminal_send_enabled: bool,
    /// `store.durability`: `normal` (default, `synchronous=NORMAL`) or `full`.
    pub store_durability: ether_store::Durability,
    /// `store.index_flush_age_ms` (20 s): inbox positions are written to their tables once
    /// the oldest is this old. Longer: fewer page writes per message (more throughput), more
    /// memory, a longer rescan after a crash (nothing committed is ever lost either way).
    pub store_index_flush_age: Duration,
    /// `store.index_pending_max` (4 000 000): positions held in memory at most (~50 B each).
    pub store_index_pending_max: usize,
    /// `store.batch_wait_us` (0): how long a busy storage batch stays open for more commands
    /// after its first, at most (a tenth of it without a new command ends the wait); fewer
    /// transactions per message under load. 0 never waits.
    pub store_batch_wait: Duration,
    /// `store.batch_wait_after_ops` (64): a batch waits only when the one before had at least
    /// this many commands, so light load commits at once (no latency added); 0 always waits.
    pub store_batch_wait_after_ops: usize,
    /// `store.queue_bytes_max` (256 MiB): payload bytes (bodies, ids, events) of the commands
    /// queued for the storage thread or being applied, at most; past it a send is
    /// `unavailable` (a stalled disk sheds load instead of holding gigabytes of bodies).
    pub store_queue_bytes_max: usize,
    /// `store.position_saves_per_tick_max` (256): terminals whose ack position is saved per
    /// shard tick (4 a second); the rest wait for a later tick. Bounds the burst of store
    /// writes that would otherwise queue messages behind every terminal's position.
    pub store_position_saves_per_tick_max: usize,
    /// Logging.
    pub log: Log,
    /// The secrets this load generated (`auth.api_key`, …; empty: none): print those, and a
    /// usage example, once.
    pub secrets_generated: Vec<&'static str>,
}

/// Where `ether admin` should connect, and with which token.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    /// `HOST:PORT` of the admin listener (an unspecified IP replaced by loopback).
    pub addr: String,
    /// Admin bearer token.
    pub token: Secret,
}

/// Everything validated except the secrets still to be looked up in the data dir.
struct Prepared {
    listen: Listen,
    node: Node,
    cluster: Cluster,
    events: Events,
    tls: Option<Tls>,
    retention: Retention,
    limits: Limits,
    terminal_send_enabled: bool,
    store_durability: ether_store::Durability,
    store_index_flush_age: Duration,
    store_index_pending_max: usize,
    store_batch_wait: Duration,
    store_batch_wait_after_ops: usize,
    store_queue_bytes_max: usize,
    store_position_saves_per_tick_max: usize,
    log: Log,
    configured: Secrets,
}

impl Config {
    /// Builds the configuration: default < file (`--config`, else `ETHER_CONFIG`) < env
    /// (`ETHER_<SECTION>_<KEY>`, through `env`) < flags, validated; missing secrets are read
    /// from or generated into `<data_dir>/secrets.toml` (see `secrets_generated`).
    pub fn load(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let prepared = Prepared::from_layers(&Layers::gather(args, &env)?)?;
        let (auth, generated) = Secrets::load_or_generate(&prepared.node.data_dir, &prepared.configured)?;
        Ok(prepared.into_config(auth, generated))
    }

    /// A validated config for tests: 127.0.0.1:0 everywhere, 2 shards, fixed secrets and tiny
    /// limits (4 KiB frames, 3 terminals per user, 16 KiB queues, 1 s heartbeat, …) so overflow
    /// paths run; touches no file.
    pub fn test_min(data_dir: PathBuf) -> Config {
        let any = Some("127.0.0.1:0".to_owned());
        let raw = RawConfig {
            listen: RawListen {
                client: any.clone(),
                api: any.clone(),
                admin: any,
                client_tls: None,
                api_tls: None,
                admin_tls: None,
            },
            node: RawNode {
                shards: Some(2),
                data_dir: Some(data_dir),
                id: Some("test-node".into()),
                sched_slice_us: None,
            },
            auth: RawAuth {
                jwt_secret: Some(Secret::new("test-jwt-secret-0123456789abcdef")),
                api_key: Some(Secret::new("test-api-key-0123456789abcdef")),
                admin_token: Some(Secret::new("test-admin-token-0123456789abcdef")),
            },
            limits: RawLimits {
                frame_bytes_max: Some(4 * KIB),
                terminals_per_user_max: Some(3),
                outbound_queue_bytes_max: Some(16 * KIB),
                connections_per_shard_max: Some(64),
                handshake_timeout_ms: Some(1000),
                // Long enough that no test's terminal is closed for idleness while a loaded CI
                // machine runs it (3 s closed terminals in four tests that way); the tests of
                // idle closing set their own.
                idle_timeout_s: Some(30),
                heartbeat_s: Some(1),
                http_header_bytes_max: Some(2 * KIB),
                http_body_bytes_max: Some(64 * KIB),
                api_connections_max: Some(16),
                protocol_violations_max: Some(3),
                sync_page_max: Some(8),
                resend_timeout_ms: Some(1000),
                resend_attempts_max: Some(2),
                unacked_per_terminal_max: Some(16),
                events_pending_max: Some(64),
                drain_window_ms: Some(1000),
                group_members_max: Some(8),
                groups_per_user_max: Some(4),
                socket_send_buffer_bytes: Some(8 * KIB),
                // Parks after one tick, so every test also runs through parked connections.
                park_idle_after_ms: Some(250),
                // Tests send as fast as they can; the limits' own tests set them low.
                terminal_sends_per_s: Some(100_000),
                terminal_sends_burst: Some(100_000),
                terminal_requests_per_s: Some(100_000),
                terminal_requests_burst: Some(100_000),
                api_requests_per_s: Some(0),
                api_requests_burst: Some(1000),
                tls_handshakes_per_shard_max: Some(64),
                handshakes_per_shard_max: Some(256),
            },
            // Few position saves per tick, so the deferred ones run in tests too.
            store: RawStore { position_saves_per_tick_max: Some(2), ..RawStore::default() },
            ..RawConfig::default()
        };
        let layers = Layers(vec![Layer { kind: LayerKind::Code("Config::test_min"), raw }]);
        let prepared = Prepared::from_layers(&layers).expect("Config::test_min must validate");
        let auth = prepared.configured.complete().expect("Config::test_min sets every secret");
        prepared.into_config(auth, Vec::new())
    }

    /// The effective configuration as JSON shaped like the TOML file, every secret `"***"`
    /// (and any password inside a URL too); for `GET /admin/v1/config` and start-up logs.
    pub fn redacted_json(&self) -> serde_json::Value {
        let limits = &self.limits;
        json!({
            "listen": {
                "client": self.listen.client.to_string(),
                "api": self.listen.api.to_string(),
                "admin": self.listen.admin.to_string(),
                "client_tls": self.listen.client_tls.map(|a| a.to_string()),
                "api_tls": self.listen.api_tls.map(|a| a.to_string()),
                "admin_tls": self.listen.admin_tls.map(|a| a.to_string()),
            },
            "tls": {
                "cert_path": self.tls.as_ref().map(|t| t.cert_path.to_string_lossy().into_owned()),
                "key_path": self.tls.as_ref().map(|t| t.key_path.to_string_lossy().into_owned()),
                "reload_check_s": self.tls.as_ref().map(|t| t.reload_check.as_secs()),
            },
            "node": {
                "shards": self.node.shards,
                "data_dir": self.node.data_dir.to_string_lossy(),
                "id": self.node.id,
                "sched_slice_us": u64::try_from(self.node.sched_slice.as_micros()).unwrap_or(u64::MAX),
            },
            "auth": {
                "jwt_secret": "***",
                "api_key": "***",
                "admin_token": "***",
            },
            "cluster": {
                "redis_url": self.cluster.redis_url.as_deref().map(redact_userinfo),
                "node_id": self.node.id,
            },
            "events": {
                "webhook_url": self.events.webhook.as_ref().map(|w| redact_userinfo(&w.url)),
                "webhook_secret": self.events.webhook.as_ref().map(|_| "***"),
                "webhook_ca_path": self.events.webhook.as_ref().and_then(|w| w.ca_path.as_ref()).map(|p| p.to_string_lossy().into_owned()),
                "batch_wait_ms": u64::try_from(self.events.batch_wait.as_millis()).unwrap_or(u64::MAX),
                "group_unreached_members_max": self.events.group_unreached_members_max,
                "outbox_max": self.events.outbox_max,
            },
            "retention": { "days": self.retention.days },
            "limits": {
                "frame_bytes_max": limits.frame_bytes_max,
                "terminals_per_user_max": limits.terminals_per_user_max,
                "outbound_queue_bytes_max": limits.outbound_queue_bytes_max,
                "connections_per_shard_max": limits.connections_per_shard_max,
                "handshake_timeout_ms": u64::try_from(limits.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
                "idle_timeout_s": limits.idle_timeout.as_secs(),
                "heartbeat_s": limits.heartbeat_s,
                "http_header_bytes_max": limits.http_header_bytes_max,
                "http_body_bytes_max": limits.http_body_bytes_max,
                "api_connections_max": limits.api_connections_max,
                "protocol_violations_max": limits.protocol_violations_max,
                "sync_page_max": limits.sync_page_max,
                "resend_timeout_ms": u64::try_from(limits.resend_timeout.as_millis()).unwrap_or(u64::MAX),
                "resend_attempts_max": limits.resend_attempts_max,
                "unacked_per_terminal_max": limits.unacked_per_terminal_max,
                "events_pending_max": limits.events_pending_max,
                "drain_window_ms": u64::try_from(limits.drain_window.as_millis()).unwrap_or(u64::MAX),
                "group_members_max": limits.group_members_max,
                "groups_per_user_max": limits.groups_per_user_max,
                "socket_send_buffer_bytes": limits.socket_send_buffer_bytes,
                "park_idle_after_ms": u64::try_from(limits.park_idle_after.as_millis()).unwrap_or(u64::MAX),
                "terminal_sends_per_s": limits.terminal_sends_per_s,
                "terminal_sends_burst": limits.terminal_sends_burst,
                "terminal_requests_per_s": limits.terminal_requests_per_s,
                "terminal_requests_burst": limits.terminal_requests_burst,
                "api_requests_per_s": limits.api_requests_per_s,
                "api_requests_burst": limits.api_requests_burst,
                "tls_handshakes_per_shard_max": limits.tls_handshakes_per_shard_max,
                "handshakes_per_shard_max": limits.handshakes_per_shard_max,
            },
            "terminal": { "send_enabled": self.terminal_send_enabled },
            "store": { "durability": match self.store_durability {
                ether_store::Durability::Normal => "normal",
                ether_store::Durability::Full => "full",
            },
            "index_flush_age_ms": u64::try_from(self.store_index_flush_age.as_millis()).unwrap_or(u64::MAX),
            "index_pending_max": self.store_index_pending_max,
            "batch_wait_us": u64::try_from(self.store_batch_wait.as_micros()).unwrap_or(u64::MAX),
            "batch_wait_after_ops": self.store_batch_wait_after_ops,
            "queue_bytes_max": self.store_queue_bytes_max,
            "position_saves_per_tick_max": self.store_position_saves_per_tick_max },
            "log": { "format": self.log.format.as_str(), "level": self.log.level },
        })
    }
}

/// The secret `ether token` signs with: configured (file/env), else `<data>/secrets.toml`;
/// never generates one.
pub fn token_secret(args: &TokenArgs, env: impl Fn(&str) -> Option<String>) -> Result<Secret, ConfigError> {
    let prepared = Prepared::from_layers(&Layers::gather(&args.serve_args(), &env)?)?;
    if let Some(secret) = prepared.configured.jwt_secret {
        return Ok(secret);
    }
    let data_dir = &prepared.node.data_dir;
    Secrets::read(data_dir)?
        .jwt_secret
        .ok_or_else(|| ConfigError::MissingSecret { key: "auth.jwt_secret", path: Secrets::path(data_dir) })
}

/// Where `ether admin` connects: `--addr`, else `ETHER_ADMIN_ADDR`, else `<data>/ports.json`,
/// else `listen.admin`; token from `--token`, else config/env, else `<data>/secrets.toml`.
pub fn admin_target(args: &AdminArgs, env: impl Fn(&str) -> Option<String>) -> Result<AdminTarget, ConfigError> {
    let addr = args.addr.clone().or_else(|| env(ADMIN_ADDR_ENV).filter(|a| !a.is_empty()));
    let token = args.token.clone().map(Secret::new);
    if let (Some(addr), Some(token)) = (&addr, &token) {
        return Ok(AdminTarget { addr: addr.clone(), token: token.clone() });
    }
    let prepared = Prepared::from_layers(&Layers::gather(&args.serve_args(), &env)?)?;
    let data_dir = &prepared.node.data_dir;
    let addr = match addr {
        Some(addr) => addr,
        None => {
            let bound = match PortsFile::read(data_dir) {
                Ok(ports) => ports.admin,
                Err(e) if e.is_not_found() => prepared.listen.admin,
                Err(e) => return Err(e.into()),
            };
            connectable(bound).to_string()
        }
    };
    let token = match token.or(prepared.configured.admin_token) {
        Some(token) => token,
        None => Secrets::read(data_dir)?
            .admin_token
            .ok_or_else(|| ConfigError::MissingSecret { key: "auth.admin_token", path: Secrets::path(data_dir) })?,
    };
    Ok(AdminTarget { addr, token })
}

/// A listen address one can connect to: `0.0.0.0`/`::` become loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// `scheme://user:pass@host/…` → `scheme://***@host/…`; other URLs unchanged.
pub(crate) fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

impl Prepared {
    /// Parses and checks every key of the merged layers; pure (reads only the host name).
    fn from_layers(layers: &Layers) -> Result<Prepared, ConfigError> {
        let raw = layers.merged();
        let check = Check { layers };

        let listen = Listen {
            client: check.addr("listen.client", raw.listen.client.as_deref(), "0.0.0.0:9000")?,
            api: check.addr("listen.api", raw.listen.api.as_deref(), "127.0.0.1:9001")?,
            admin: check.addr("listen.admin", raw.listen.admin.as_deref(), "127.0.0.1:9002")?,
            client_tls: match raw.listen.client_tls.as_deref() {
                Some(text) => Some(check.addr("listen.client_tls", Some(text), "")?),
                None => None,
            },
            api_tls: match raw.listen.api_tls.as_deref() {
                Some(text) => Some(check.addr("listen.api_tls", Some(text), "")?),
                None => None,
            },
            admin_tls: match raw.listen.admin_tls.as_deref() {
                Some(text) => Some(check.addr("listen.admin_tls", Some(text), "")?),
                None => None,
            },
        };
        let any_tls = listen.client_tls.or(listen.api_tls).or(listen.admin_tls);
        let tls = match (any_tls, raw.tls.cert_path, raw.tls.key_path) {
            (Some(_), Some(cert_path), Some(key_path)) => {
                for (key, path) in [("tls.cert_path", &cert_path), ("tls.key_path", &key_path)] {
                    if path.as_os_str().is_empty() {
                        return Err(check.invalid(key, "must not be empty"));
                    }
                }
                let reload_check = Duration::from_secs(check.bounded(
                    "tls.reload_check_s",
                    raw.tls.reload_check_s,
                    TLS_RELOAD_CHECK_S_DEFAULT,
                )?);
                Some(Tls { cert_path, key_path, reload_check })
            }
            (Some(_), None, _) => {
                return Err(check.invalid("tls.cert_path", "a TLS listener is set: give the PEM certificate chain"))
            }
            (Some(_), _, None) => {
                return Err(check.invalid("tls.key_path", "a TLS listener is set: give the PEM private key"))
            }
            (None, Some(_), _) => {
                return Err(check.invalid(
                    "tls.cert_path",
                    "set, but no TLS listener is (listen.client_tls, listen.api_tls, listen.admin_tls): set one, or no files",
                ))
            }
            (None, None, Some(_)) => {
                return Err(check.invalid(
                    "tls.key_path",
                    "set, but no TLS listener is (listen.client_tls, listen.api_tls, listen.admin_tls): set one, or no files",
                ))
            }
            (None, None, None) => {
                if raw.tls.reload_check_s.is_some() {
                    return Err(check.invalid(
                        "tls.reload_check_s",
                        "set, but no TLS listener is (listen.client_tls, listen.api_tls, listen.admin_tls): set one, or leave it out",
                    ));
                }
                None
            }
        };

        let node = Node {
            shards: check.bounded("node.shards", raw.node.shards, default_shards())?,
            data_dir: match raw.node.data_dir {
                Some(dir) if dir.as_os_str().is_empty() => {
                    return Err(check.invalid("node.data_dir", "must not be empty"))
                }
                Some(dir) => dir,
                None => PathBuf::from("./ether-data"),
            },
            id: node_id(layers)?,
            sched_slice: Duration::from_micros(check.sched_slice_us(raw.node.sched_slice_us)?),
        };

        let cluster = Cluster {
            redis_url: match raw.cluster.redis_url {
                Some(url) => {
                    Some(check.url("cluster.redis_url", url, &["redis://", "rediss://", "redis+unix://", "unix://"])?)
                }
                None => None,
            },
        };

        if raw.events.webhook_url.is_none() && raw.events.webhook_ca_path.is_some() {
            tracing::warn!("events.webhook_ca_path is set but events.webhook_url is not; it is not used");
        }
        let webhook = match (raw.events.webhook_url, raw.events.webhook_secret) {
            (Some(url), Some(secret)) => Some(Webhook {
                url: check.url("events.webhook_url", url, &["http://", "https://"])?,
                secret: check.secret("events.webhook_secret", secret)?,
                ca_path: match raw.events.webhook_ca_path {
                    Some(p) if p.as_os_str().is_empty() => {
                        return Err(check.invalid("events.webhook_ca_path", "must not be empty"))
                    }
                    other => other,
                },
            }),
            (Some(_), None) => {
                return Err(check.invalid(
                    "events.webhook_url",
                    "needs events.webhook_secret to sign deliveries (ETHER_EVENTS_WEBHOOK_SECRET)",
                ))
            }
            (None, Some(secret)) => {
                check.secret("events.webhook_secret", secret)?;
                tracing::warn!("events.webhook_secret is set but events.webhook_url is not; no events will be sent");
                None
            }
            (None, None) => None,
        };

        let retention = Retention { days: check.bounded("retention.days", raw.retention.days, 30)? };

        let d = Limits::default();
        let l = &raw.limits;
        let limits = Limits {
            frame_bytes_max: check.bounded("limits.frame_bytes_max", l.frame_bytes_max, d.frame_bytes_max)?,
            terminals_per_user_max: check.bounded(
                "limits.terminals_per_user_max",
                l.terminals_per_user_max,
                d.terminals_per_user_max,
            )?,
            outbound_queue_bytes_max: check.bounded(
                "limits.outbound_queue_bytes_max",
                l.outbound_queue_bytes_max,
                d.outbound_queue_bytes_max,
            )?,
            connections_per_shard_max: check.bounded(
                "limits.connections_per_shard_max",
                l.connections_per_shard_max,
                d.connections_per_shard_max,
            )?,
            handshake_timeout: Duration::from_millis(check.bounded(
                "limits.handshake_timeout_ms",
                l.handshake_timeout_ms,
                5_000,
            )?),
            idle_timeout: Duration::from_secs(check.bounded("limits.idle_timeout_s", l.idle_timeout_s, 90)?),
            heartbeat_s: check.bounded("limits.heartbeat_s", l.heartbeat_s, d.heartbeat_s)?,
            http_header_bytes_max: check.bounded(
                "limits.http_header_bytes_max",
                l.http_header_bytes_max,
                d.http_header_bytes_max,
            )?,
            http_body_bytes_max: check.bounded(
                "limits.http_body_bytes_max",
                l.http_body_bytes_max,
                d.http_body_bytes_max,
            )?,
            api_connections_max: check.bounded(
                "limits.api_connections_max",
                l.api_connections_max,
                d.api_connections_max,
            )?,
            protocol_violations_max: check.bounded(
                "limits.protocol_violations_max",
                l.protocol_violations_max,
                d.protocol_violations_max,
            )?,
            sync_page_max: check.bounded("limits.sync_page_max", l.sync_page_max, d.sync_page_max)?,
            resend_timeout: Duration::from_millis(check.bounded(
                "limits.resend_timeout_ms",
                l.resend_timeout_ms,
                u64::try_from(d.resend_timeout.as_millis()).unwrap_or(u64::MAX),
            )?),
            resend_attempts_max: check.bounded(
                "limits.resend_attempts_max",
                l.resend_attempts_max,
                d.resend_attempts_max,
            )?,
            unacked_per_terminal_max: check.bounded(
                "limits.unacked_per_terminal_max",
                l.unacked_per_terminal_max,
                d.unacked_per_terminal_max,
            )?,
            events_pending_max: check.bounded(
                "limits.events_pending_max",
                l.events_pending_max,
                d.events_pending_max,
            )?,
            drain_window: Duration::from_millis(check.bounded(
                "limits.drain_window_ms",
                l.drain_window_ms,
                u64::try_from(d.drain_window.as_millis()).unwrap_or(u64::MAX),
            )?),
            group_members_max: check.bounded("limits.group_members_max", l.group_members_max, d.group_members_max)?,
            groups_per_user_max: check.bounded(
                "limits.groups_per_user_max",
                l.groups_per_user_max,
                d.groups_per_user_max,
            )?,
            socket_send_buffer_bytes: check.bounded(
                "limits.socket_send_buffer_bytes",
                l.socket_send_buffer_bytes,
                d.socket_send_buffer_bytes,
            )?,
            park_idle_after: Duration::from_millis(check.bounded(
                "limits.park_idle_after_ms",
                l.park_idle_after_ms,
                u64::try_from(d.park_idle_after.as_millis()).unwrap_or(u64::MAX),
            )?),
            terminal_sends_per_s: check.bounded(
                "limits.terminal_sends_per_s",
                l.terminal_sends_per_s,
                d.terminal_sends_per_s,
            )?,
            terminal_sends_burst: check.bounded(
                "limits.terminal_sends_burst",
                l.terminal_sends_burst,
                d.terminal_sends_burst,
            )?,
            terminal_requests_per_s: check.bounded(
                "limits.terminal_requests_per_s",
                l.terminal_requests_per_s,
                d.terminal_requests_per_s,
            )?,
            terminal_requests_burst: check.bounded(
                "limits.terminal_requests_burst",
                l.terminal_requests_burst,
                d.terminal_requests_burst,
            )?,
            api_requests_per_s: check.bounded(
                "limits.api_requests_per_s",
                l.api_requests_per_s,
                d.api_requests_per_s,
            )?,
            api_requests_burst: check.bounded(
                "limits.api_requests_burst",
                l.api_requests_burst,
                d.api_requests_burst,
            )?,
            tls_handshakes_per_shard_max: check.bounded(
                "limits.tls_handshakes_per_shard_max",
                l.tls_handshakes_per_shard_max,
                d.tls_handshakes_per_shard_max,
            )?,
            handshakes_per_shard_max: check.bounded(
                "limits.handshakes_per_shard_max",
                l.handshakes_per_shard_max,
                d.handshakes_per_shard_max,
            )?,
        };
        if limits.idle_timeout.as_secs() <= limits.heartbeat_s {
            return Err(check.invalid(
                "limits.idle_timeout_s",
                format!(
                    "must exceed limits.heartbeat_s = {} (from {}), got {}",
                    limits.heartbeat_s,
                    layers.origin("limits.heartbeat_s"),
                    limits.idle_timeout.as_secs()
                ),
            ));
        }
        if limits.outbound_queue_bytes_max < limits.frame_bytes_max {
            return Err(check.invalid(
                "limits.outbound_queue_bytes_max",
                format!(
                    "must hold at least one frame: limits.frame_bytes_max = {} (from {}), got {}",
                    limits.frame_bytes_max,
                    layers.origin("limits.frame_bytes_max"),
                    limits.outbound_queue_bytes_max
                ),
            ));
        }

        let log = Log {
            format: match raw.log.format.as_deref() {
                None | Some("human") => LogFormat::Human,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(check.invalid("log.format", format!("expected human or json, got {other:?}")))
                }
            },
            level: match raw.log.level {
                None => "info".to_owned(),
                Some(level) if level.trim().is_empty() => {
                    return Err(check.invalid("log.level", "must not be empty"))
                }
                Some(level) if level.len() > LOG_LEVEL_BYTES_MAX || level.chars().any(char::is_control) => {
                    return Err(check.invalid(
                        "log.level",
                        format!("must be a filter like info or info,ether_engine=debug of at most {LOG_LEVEL_BYTES_MAX} bytes"),
                    ))
                }
                Some(level) => {
                    let level = level.trim().to_owned();
                    log_filter_problem(&level).map_or(Ok(()), |problem| Err(check.invalid("log.level", problem)))?;
                    level
                }
            },
        };

        let configured = Secrets {
            jwt_secret: raw.auth.jwt_secret.map(|s| check.secret("auth.jwt_secret", s)).transpose()?,
            api_key: raw.auth.api_key.map(|s| check.secret("auth.api_key", s)).transpose()?,
            admin_token: raw.auth.admin_token.map(|s| check.secret("auth.admin_token", s)).transpose()?,
        };

        Ok(Prepared {
            listen,
            node,
            cluster,
            events: Events {
                webhook,
                batch_wait: Duration::from_millis(check.bounded(
                    "events.batch_wait_ms",
                    raw.events.batch_wait_ms,
                    EVENTS_BATCH_WAIT_MS_DEFAULT,
                )?),
                group_unreached_members_max: check.bounded(
                    "events.group_unreached_members_max",
                    raw.events.group_unreached_members_max,
                    EVENTS_GROUP_UNREACHED_MEMBERS_MAX_DEFAULT,
                )?,
                outbox_max: check.bounded("events.outbox_max", raw.events.outbox_max, EVENTS_OUTBOX_MAX_DEFAULT)?,
            },
            tls,
            retention,
            limits,
            terminal_send_enabled: raw.terminal.send_enabled.unwrap_or(true),
            store_durability: match raw.store.durability.as_deref() {
                None | Some("normal") => ether_store::Durability::Normal,
                Some("full") => ether_store::Durability::Full,
                Some(other) => {
                    return Err(check.invalid("store.durability", format!("expected normal or full, got {other:?}")))
                }
            },
            store_index_flush_age: Duration::from_millis(check.bounded(
                "store.index_flush_age_ms",
                raw.store.index_flush_age_ms,
                STORE_INDEX_FLUSH_AGE_MS_DEFAULT,
            )?),
            store_index_pending_max: check.bounded(
                "store.index_pending_max",
                raw.store.index_pending_max,
                STORE_INDEX_PENDING_MAX_DEFAULT,
            )?,
            store_batch_wait: Duration::from_micros(check.bounded(
                "store.batch_wait_us",
                raw.store.batch_wait_us,
                STORE_BATCH_WAIT_US_DEFAULT,
            )?),
            store_batch_wait_after_ops: check.bounded(
                "store.batch_wait_after_ops",
                raw.store.batch_wait_after_ops,
                STORE_BATCH_WAIT_AFTER_OPS_DEFAULT,
            )?,
            store_queue_bytes_max: check.bounded(
                "store.queue_bytes_max",
                raw.store.queue_bytes_max,
                STORE_QUEUE_BYTES_MAX_DEFAULT,
            )?,
            store_position_saves_per_tick_max: check.bounded(
                "store.position_saves_per_tick_max",
                raw.store.position_saves_per_tick_max,
                STORE_POSITION_SAVES_PER_TICK_MAX_DEFAULT,
            )?,
            log,
            configured,
        })
    }

    fn into_config(self, auth: AuthSecrets, secrets_generated: Vec<&'static str>) -> Config {
        Config {
            listen: self.listen,
            node: self.node,
            auth,
            cluster: self.cluster,
            events: self.events,
            tls: self.tls,
            retention: self.retention,
            limits: self.limits,
            terminal_send_enabled: self.terminal_send_enabled,
            store_durability: self.store_durability,
            store_index_flush_age: self.store_index_flush_age,
            store_index_pending_max: self.store_index_pending_max,
            store_batch_wait: self.store_batch_wait,
            store_batch_wait_after_ops: self.store_batch_wait_after_ops,
            store_queue_bytes_max: self.store_queue_bytes_max,
            store_position_saves_per_tick_max: self.store_position_saves_per_tick_max,
            log: self.log,
            secrets_generated,
        }
    }
}

/// An integer type a bounded key holds.
trait Bounded: Copy {
    fn as_u64(self) -> u64;
}

macro_rules! bounded_integer {
    ($($ty:ty),*) => {$(
        impl Bounded for $ty {
            fn as_u64(self) -> u64 {
                u64::try_from(self).unwrap_or(u64::MAX)
            }
        }
    )*};
}
bounded_integer!(u32, u64, usize);

/// Checks one key at a time and names its winning source in errors.
struct Check<'a> {
    layers: &'a Layers,
}

impl Check<'_> {
    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key, origin: self.layers.origin(key), message: message.into() }
    }

    /// `value` (or `default`) within the key's [`LIMIT_BOUNDS`].
    fn bounded<T: Bounded>(&self, key: &'static str, value: Option<T>, default: T) -> Result<T, ConfigError> {
        let (_, min, max) = LIMIT_BOUNDS
            .iter()
            .find(|(k, _, _)| *k == key)
            .copied()
            .unwrap_or_else(|| panic!("{key} has no entry in LIMIT_BOUNDS"));
        let value = value.unwrap_or(default);
        let n = value.as_u64();
        if n < min || n > max {
            return Err(self.invalid(key, format!("must be in {min}..={max}, got {n}")));
        }
        Ok(value)
    }

    /// `node.sched_slice_us`: 0 (the kernel's default) or a slice the kernel keeps as asked;
    /// it raises anything under 100 µs to 100 µs without a word, so that is refused here.
    fn sched_slice_us(&self, value: Option<u64>) -> Result<u64, ConfigError> {
        const KEY: &str = "node.sched_slice_us";
        let max = LIMIT_BOUNDS.iter().find(|(k, _, _)| *k == KEY).map_or(0, |(_, _, max)| *max);
        let us = value.unwrap_or(NODE_SCHED_SLICE_US_DEFAULT);
        if us != 0 && !(SCHED_SLICE_US_MIN..=max).contains(&us) {
            return Err(self.invalid(
                KEY,
                format!(
                    "must be 0 (the kernel's default) or in {SCHED_SLICE_US_MIN}..={max} (shorter slices the kernel raises to {SCHED_SLICE_US_MIN}), got {us}"
                ),
            ));
        }
        self.bounded(KEY, Some(us), NODE_SCHED_SLICE_US_DEFAULT)
    }

    fn addr(&self, key: &'static str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
        let text = value.unwrap_or(default);
        text.trim().parse().map_err(|_| {
            self.invalid(key, format!("expected IP:PORT such as 0.0.0.0:9000 or [::1]:9000, got {text:?}"))
        })
    }

    fn url(&self, key: &'static str, url: String, schemes: &[&str]) -> Result<String, ConfigError> {
        let url = url.trim().to_owned();
        if !schemes.iter().any(|s| url.starts_with(s)) {
            return Err(self.invalid(key, format!("must start with {}", schemes.join(" or "))));
        }
        if url.len() > URL_BYTES_MAX || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.invalid(key, format!("must be at most {URL_BYTES_MAX} bytes without spaces")));
        }
        Ok(url)
    }

    fn secret(&self, key: &'static str, secret: Secret) -> Result<Secret, ConfigError> {
        let short = key.rsplit('.').next().unwrap_or(key);
        validate_secret(short, secret.expose()).map_err(|problem| self.invalid(key, problem))?;
        Ok(secret)
    }
}

/// Why `level` is not a log filter the node would apply as written, or `None`: a directive the
/// filter parser refuses (it would be dropped with a note), or a bare word that is not a level
/// (`warning` is read as a target name, leaving only errors logged).
fn log_filter_problem(level: &str) -> Option<String> {
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    const NAMES: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = directive.parse::<tracing::level_filters::LevelFilter>().is_ok();
        if !is_level && !directive.contains(['=', '[']) {
            let word = directive.to_ascii_lowercase();
            let hint = match NAMES.iter().find(|n| word.starts_with(**n) || n.starts_with(word.as_str())) {
                Some(name) => format!(" (did you mean `{name}`?)"),
                None => did_you_mean(&word, &NAMES),
            };
            return Some(format!(
                "{directive:?} is not a level: use one of {LEVELS}, or TARGET=LEVEL (e.g. info,ether_engine=debug){hint}"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .err()
        .map(|e| format!("not a filter like info or info,ether_engine=debug ({e}); levels are {LEVELS}"))
}

/// Shards when nobody says: online CPUs, within 1..=SHARDS_MAX.
fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, SHARDS_MAX)
}

/// `node.id`, or its alias `cluster.node_id`, from the highest source setting either; both in
/// one source must agree. Default: the host name, else `node-1`.
fn node_id(layers: &Layers) -> Result<String, ConfigError> {
    for layer in layers.0.iter().rev() {
        let (key, id) = match (&layer.raw.node.id, &layer.raw.cluster.node_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(ConfigError::Invalid {
                    key: "node.id",
                    origin: layer.source_of("node.id"),
                    message: format!("{a:?} conflicts with cluster.node_id = {b:?} from the same source"),
                })
            }
            (Some(id), _) => ("node.id", id),
            (None, Some(id)) => ("cluster.node_id", id),
            (None, None) => continue,
        };
        if !valid_node_id(id) {
            return Err(ConfigError::Invalid {
                key,
                origin: layer.source_of(key),
                message: format!("expected 1..={NODE_ID_BYTES_MAX} characters of [A-Za-z0-9_.:-], got {id:?}"),
            });
        }
        return Ok(id.clone());
    }
    Ok(default_node_id())
}

fn valid_node_id(id: &str) -> bool {
    (1..=NODE_ID_BYTES_MAX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

fn default_node_id() -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_.:-".contains(c) { c } else { '-' })
        .take(NODE_ID_BYTES_MAX)
        .collect();
    if valid_node_id(&id) {
        id
    } else {
        "node-1".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    /// A fake environment.
    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |key| map.get(key).cloned()
    }

    fn no_env() -> impl Fn(&str) -> Option<String> {
        env(&[])
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture { dir: tempfile::tempdir().unwrap() }
        }
        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }
        fn file(&self, toml: &str) -> PathBuf {
            let path = self.dir.path().join("ether.toml");
            fs::write(&path, toml).unwrap();
            path
        }
        /// Serve args pointing the data dir into the fixture.
        fn args(&self) -> ServeArgs {
            ServeArgs { data: Some(self.data()), ..ServeArgs::default() }
        }
    }

    fn invalid(err: ConfigError) -> (&'static str, Source, String) {
        match err {
            ConfigError::Invalid { key, origin, message } => (key, origin, message),
            other => panic!("expected Invalid, got {other:?}: {other}"),
        }
    }

    #[test]
    fn defaults_with_nothing_configured() {
        let fx = Fixture::new();
        let config = Config::load(&fx.args(), no_env()).unwrap();
        assert_eq!(config.listen.client, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.listen.api, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(config.listen.admin, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(config.node.shards, default_shards());
        assert!((1..=SHARDS_MAX).contains(&config.node.shards));
        assert!(valid_node_id(&config.node.id), "{:?}", config.node.id);
        assert_eq!(config.cluster.redis_url, None);
        assert!(config.events.webhook.is_none());
        assert_eq!(config.retention.days, 30);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(5));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(90));
        assert!(config.terminal_send_enabled);
        assert_eq!(config.log, Log { format: LogFormat::Human, level: "info".into() });
        assert_eq!(config.secrets_generated.len(), 3, "first start generates secrets");
        assert!(Secrets::path(&fx.data()).exists());

        let again = Config::load(&fx.args(), no_env()).unwrap();
        assert!(again.secrets_generated.is_empty(), "second start reuses them");
        assert_eq!(again.auth.jwt_secret.expose(), config.auth.jwt_secret.expose());
        assert_eq!(again.auth.api_key.expose(), config.auth.api_key.expose());
        assert_eq!(again.auth.admin_token.expose(), config.auth.admin_token.expose());
    }

    #[test]
    fn default_data_dir() {
        let layers = Layers::gather(&ServeArgs::default(), &no_env()).unwrap();
        assert_eq!(Prepared::from_layers(&layers).unwrap().node.data_dir, PathBuf::from("./ether-data"));
    }

    #[test]
    fn precedence_flag_over_env_over_file_over_default() {
        let fx = Fixture::new();
        let file = fx.file(
            r#"
            [listen]
            client = "127.0.0.1:7001"
            api = "127.0.0.1:7002"
            admin = "127.0.0.1:7003"
            [node]
            shards = 3
            [limits]
            frame_bytes_max = 32768
            heartbeat_s = 20
            [log]
            level = "warn"
            format = "json"
            "#,
        );
        let args = ServeArgs {
            config: Some(file),
            listen_client: Some("127.0.0.1:9101".parse().unwrap()),
            shards: Some(5),
            ..fx.args()
        };
        let env = env(&[
            ("ETHER_LISTEN_CLIENT", "127.0.0.1:8001"),
            ("ETHER_LISTEN_API", "127.0.0.1:8002"),
            ("ETHER_NODE_SHARDS", "4"),
            ("ETHER_LIMITS_FRAME_BYTES_MAX", "16384"),
            ("ETHER_LOG_LEVEL", "debug"),
        ]);
        let config = Config::load(&args, env).unwrap();
        assert_eq!(config.listen.client, "127.0.0.1:9101".parse().unwrap(), "flag beats env and file");
        assert_eq!(config.node.shards, 5, "flag beats env and file");
        assert_eq!(config.listen.api, "127.0.0.1:8002".parse().unwrap(), "env beats file");
        assert_eq!(config.limits.frame_bytes_max, 16384, "env beats file");
        assert_eq!(config.log.level, "debug", "env beats file");
        assert_eq!(config.listen.admin, "127.0.0.1:7003".parse().unwrap(), "file beats default");
        assert_eq!(config.limits.heartbeat_s, 20, "file beats default");
        assert_eq!(config.log.format, LogFormat::Json, "file beats default");
        assert_eq!(config.limits.sync_page_max, 500, "default when nobody says");
    }

    #[test]
    fn config_file_from_env_and_flag_wins() {
        let fx = Fixture::new();
        let from_env = fx.dir.path().join("env.toml");
        fs::write(&from_env, "[retention]\ndays = 7\n").unwrap();
        let from_flag = fx.file("[retention]\ndays = 9\n");
        let path = from_env.to_str().unwrap();

        let config = Config::load(&fx.args(), env(&[("ETHER_CONFIG", path)])).unwrap();
        assert_eq!(config.retention.days, 7, "ETHER_CONFIG names the file");

        let args = ServeArgs { config: Some(from_flag), ..fx.args() };
        let config = Config::load(&args, env(&[("ETHER_CONFIG", path)])).unwrap();
        assert_eq!(config.retention.days, 9, "--config beats ETHER_CONFIG");

        let args = ServeArgs { config: Some(fx.dir.path().join("missing.toml")), ..fx.args() };
        let err = Config::load(&args, no_env()).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn every_key_has_its_env_var() {
        assert_eq!(env_var("listen.client"), "ETHER_LISTEN_CLIENT");
        assert_eq!(env_var("node.data_dir"), "ETHER_NODE_DATA_DIR");
        assert_eq!(env_var("limits.frame_bytes_max"), "ETHER_LIMITS_FRAME_BYTES_MAX");
        let all: Vec<(String, String)> = RawConfig::KEYS
            .iter()
            .map(|k| {
                let value = match *k {
                    "node.shards" | "limits.terminals_per_user_max" | "limits.heartbeat_s" => "2",
                    "node.sched_slice_us" => "200",
                    "retention.days"
                    | "limits.protocol_violations_max"
                    | "limits.sync_page_max"
                    | "limits.resend_attempts_max" => "2",
                    "node.data_dir" | "node.id" | "cluster.node_id" => "n",
                    "terminal.send_enabled" => "false",
                    "store.durability" => "full",
                    "store.index_flush_age_ms" | "store.index_pending_max" => "4096",
                    "store.queue_bytes_max" => "1048576",
                    "store.batch_wait_us"
                    | "store.position_saves_per_tick_max"
                    | "store.batch_wait_after_ops"
                    | "events.batch_wait_ms"
                    | "events.group_unreached_members_max"
                    | "events.outbox_max" => "4096",
                    k if k.starts_with("limits.") => "4096",
                    "tls.reload_check_s" => "30",
                    _ => "some-string-value-16",
                };
                (env_var(k), value.to_owned())
            })
            .collect();
        let map: HashMap<_, _> = all.into_iter().collect();
        let raw = RawConfig::from_env(|k| map.get(k).cloned()).unwrap();
        for key in RawConfig::KEYS {
            assert!(raw.is_set(key), "{key} is not read from {}", env_var(key));
        }
        assert!(RawConfig::from_env(|_| Some(String::new())).is_ok(), "empty means unset");
        assert!(!RawConfig::from_env(|_| Some(String::new())).unwrap().is_set("node.shards"));
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let err = RawConfig::from_env(env(&[("ETHER_NODE_SHARDS", "x")])).unwrap_err();
        assert_eq!(err.to_string(), r#"ETHER_NODE_SHARDS: expected an integer in 1..=256, got "x""#);
        let err = RawConfig::from_env(env(&[("ETHER_LIMITS_IDLE_TIMEOUT_S", "-3")])).unwrap_err();
        assert_eq!(err.to_string(), r#"ETHER_LIMITS_IDLE_TIMEOUT_S: expected an integer in 1..=86400, got "-3""#);
        // Too large for the key's type: still the key's range, not "a positive integer".
        let err = RawConfig::from_env(env(&[("ETHER_RETENTION_DAYS", "5000000000")])).unwrap_err();
        assert_eq!(err.to_string(), r#"ETHER_RETENTION_DAYS: expected an integer in 1..=3650, got "5000000000""#);
        let err = RawConfig::from_set_flags(&[("limits.frame_bytes_max".into(), "1e6".into())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"--set limits.frame_bytes_max: expected an integer in 1024..=16777216, got "1e6""#
        );
        let err = RawConfig::from_env(env(&[("ETHER_TERMINAL_SEND_ENABLED", "maybe")])).unwrap_err();
        assert_eq!(err.to_string(), r#"ETHER_TERMINAL_SEND_ENABLED: expected true or false, got "maybe""#);
        let fx = Fixture::new();
        let err = Config::load(&fx.args(), env(&[("ETHER_RETENTION_DAYS", "30d")])).unwrap_err();
        assert!(err.to_string().starts_with("ETHER_RETENTION_DAYS:"), "{err}");
        assert!(!fx.data().exists(), "a refused config creates nothing");

        let raw = RawConfig::from_env(env(&[("ETHER_TERMINAL_SEND_ENABLED", "off")])).unwrap();
        assert_eq!(raw.terminal.send_enabled, Some(false));
    }

    #[test]
    fn toml_typos_are_rejected_with_the_key() {
        let cases = [
            ("[node]\nshardz = 3\n", "node.shardz: unknown key", "did you mean `shards`"),
            ("[limits]\nframe_byte_max = 1\n", "limits.frame_byte_max: unknown key", "`frame_bytes_max`"),
            ("[listn]\nclient = \"x\"\n", "listn: unknown section", "did you mean `listen`"),
            ("[node]\nshards = \"x\"\n", "node.shards: expected an integer in 1..=256, got \"x\"", ""),
            ("[node]\nshards = -1\n", "node.shards: expected an integer in 1..=256, got -1", ""),
            ("[retention]\ndays = 5000000000\n", "retention.days: expected an integer in 1..=3650, got 5000000000", ""),
            ("[limits]\nheartbeat_s = 1.5\n", "limits.heartbeat_s: expected an integer in 1..=3600, got 1.5", ""),
            ("[terminal]\nsend_enabled = \"no\"\n", "terminal.send_enabled: invalid type: string \"no\"", ""),
            ("[auth]\napi_key = 5\n", "auth.api_key: invalid type", ""),
            ("node = 3\n", "node: expected a table", ""),
            ("shards = 3\n", "shards: unknown section", ""),
        ];
        for (toml, want, hint) in cases {
            let err = RawConfig::from_toml(toml).unwrap_err();
            assert!(err.starts_with(want), "{toml:?}: {err}");
            assert!(err.contains(hint), "{toml:?}: {err}");
        }
        let syntax = RawConfig::from_toml("[node\nshards = 1").unwrap_err();
        assert!(syntax.contains("line 1"), "syntax errors keep the position: {syntax}");

        let fx = Fixture::new();
        let args = ServeArgs { config: Some(fx.file("[node]\nshardz = 3\n")), ..fx.args() };
        let msg = Config::load(&args, no_env()).unwrap_err().to_string();
        assert!(msg.starts_with("config file ") && msg.contains("ether.toml: node.shardz"), "{msg}");
    }

    #[test]
    fn tls_listener_needs_both_files_and_files_need_the_listener() {
        let check = |toml: &str| {
            let raw = RawConfig::from_toml(toml).unwrap();
            let layers = Layers(vec![Layer { kind: LayerKind::Code("test"), raw }]);
            Prepared::from_layers(&layers).map(|p| (p.listen.client_tls, p.tls))
        };
        let (addr, tls) =
            check("[listen]\nclient_tls = \"127.0.0.1:9443\"\n[tls]\ncert_path = \"c.pem\"\nkey_path = \"k.pem\"\n")
                .unwrap();
        assert_eq!(addr, Some("127.0.0.1:9443".parse().unwrap()));
        let reload_check = Duration::from_secs(10);
        assert_eq!(tls, Some(Tls { cert_path: "c.pem".into(), key_path: "k.pem".into(), reload_check }));
        assert_eq!(check("").unwrap(), (None, None), "no TLS by default");
        for (toml, key, says) in [
            (
                "[listen]\nclient_tls = \"127.0.0.1:9443\"\n[tls]\nkey_path = \"k.pem\"\n",
                "tls.cert_path",
                "give the PEM certificate",
            ),
            (
                "[listen]\nclient_tls = \"127.0.0.1:9443\"\n[tls]\ncert_path = \"c.pem\"\n",
                "tls.key_path",
                "give the PEM private key",
            ),
            ("[listen]\napi_tls = \"127.0.0.1:9444\"\n[tls]\ncert_path = \"c.pem\"\n", "tls.key_path", "private key"),
            ("[tls]\ncert_path = \"c.pem\"\nkey_path = \"k.pem\"\n", "tls.cert_path", "no TLS listener is"),
            ("[listen]\nclient_tls = \"nope\"\n", "listen.client_tls", "expected IP:PORT"),
        ] {
            let (k, _, message) = invalid(check(toml).unwrap_err());
            assert_eq!(k, key, "{toml}");
            assert!(message.contains(says), "{toml}: {message}");
        }
    }

    #[test]
    fn full_toml_example_parses() {
        let raw = RawConfig::from_toml(
            r#"
            [listen]
            client = "0.0.0.0:9000"
            api = "127.0.0.1:9001"
            admin = "127.0.0.1:9002"
            client_tls = "0.0.0.0:9443"
            api_tls = "0.0.0.0:9444"
            admin_tls = "127.0.0.1:9445"
            [tls]
            cert_path = "/etc/ether/tls/fullchain.pem"
            key_path = "/etc/ether/tls/key.pem"
            reload_check_s = 10
            [node]
            shards = 4
            sched_slice_us = 200
            data_dir = "/var/lib/ether"
            id = "node-a"
            [auth]
            jwt_secret = "0123456789abcdef0123"
            api_key = "0123456789abcdef0123"
            admin_token = "0123456789abcdef0123"
            [cluster]
            redis_url = "redis://127.0.0.1:6379"
            node_id = "node-a"
            [events]
            webhook_url = "https://hooks.example.com/ether"
            webhook_secret = "0123456789abcdef0123"
            webhook_ca_path = "/etc/ether/hooks-ca.pem"
            batch_wait_ms = 20
            group_unreached_members_max = 500
            outbox_max = 200000
            [retention]
            days = 30
            [limits]
            frame_bytes_max = 65536
            terminals_per_user_max = 10
            outbound_queue_bytes_max = 1048576
            connections_per_shard_max = 100000
            handshake_timeout_ms = 5000
            idle_timeout_s = 90
            heartbeat_s = 30
            http_header_bytes_max = 8192
            http_body_bytes_max = 4194304
            api_connections_max = 10000
            protocol_violations_max = 10
            sync_page_max = 500
            resend_timeout_ms = 3000
            resend_attempts_max = 3
            unacked_per_terminal_max = 1024
            events_pending_max = 100000
            drain_window_ms = 5000
            group_members_max = 100000
            groups_per_user_max = 1000
            socket_send_buffer_bytes = 0
            park_idle_after_ms = 2000
            terminal_sends_per_s = 50
            terminal_sends_burst = 100
            terminal_requests_per_s = 20
            terminal_requests_burst = 50
            api_requests_per_s = 0
            api_requests_burst = 1000
            tls_handshakes_per_shard_max = 256
            handshakes_per_shard_max = 4096
            [terminal]
            send_enabled = false
            [store]
            durability = "full"
            index_flush_age_ms = 20000
            index_pending_max = 4000000
            batch_wait_us = 0
            batch_wait_after_ops = 64
            queue_bytes_max = 268435456
            position_saves_per_tick_max = 256
            [log]
            format = "json"
            level = "info"
            "#,
        )
        .unwrap();
        for key in RawConfig::KEYS {
            assert!(raw.is_set(key), "{key} missing from the example");
        }
        let layers = Layers(vec![Layer { kind: LayerKind::Code("test"), raw }]);
        let p = Prepared::from_layers(&layers).unwrap();
        assert_eq!(p.node.id, "node-a");
        assert!(!p.terminal_send_enabled);
        assert_eq!(p.events.batch_wait, Duration::from_millis(20));
        assert_eq!(p.events.group_unreached_members_max, 500);
        assert_eq!(p.events.outbox_max, 200_000);
        assert_eq!(p.events.webhook.unwrap().url, "https://hooks.example.com/ether");
        assert!(p.configured.complete().is_some());
    }

    #[test]
    fn validation_errors_name_key_and_source() {
        let fx = Fixture::new();

        let args = ServeArgs { shards: Some(0), ..fx.args() };
        let (key, origin, msg) = invalid(Config::load(&args, no_env()).unwrap_err());
        assert_eq!((key, origin), ("node.shards", Source::Flag("--shards")));
        assert!(msg.contains("1..=256"), "{msg}");

        let err = Config::load(&fx.args(), env(&[("ETHER_NODE_SHARDS", "0")])).unwrap_err();
        assert_eq!(err.to_string(), "node.shards (from env ETHER_NODE_SHARDS): must be in 1..=256, got 0");

        let args = ServeArgs { config: Some(fx.file("[node]\nshards = 300\n")), ..fx.args() };
        let (key, origin, _) = invalid(Config::load(&args, no_env()).unwrap_err());
        assert_eq!(key, "node.shards");
        assert!(matches!(origin, Source::File(ref p) if p.ends_with("ether.toml")));

        let (key, origin, msg) =
            invalid(Config::load(&fx.args(), env(&[("ETHER_LIMITS_IDLE_TIMEOUT_S", "30")])).unwrap_err());
        assert_eq!((key, origin), ("limits.idle_timeout_s", Source::Env("ETHER_LIMITS_IDLE_TIMEOUT_S".into())));
        assert!(msg.contains("must exceed limits.heartbeat_s = 30 (from default), got 30"), "{msg}");

        let (key, _, _) = invalid(Config::load(&fx.args(), env(&[("ETHER_LIMITS_HEARTBEAT_S", "120")])).unwrap_err());
        assert_eq!(key, "limits.idle_timeout_s", "a raised heartbeat trips the relation too");

        let (key, origin, msg) =
            invalid(Config::load(&fx.args(), env(&[("ETHER_LISTEN_API", "localhost:9001")])).unwrap_err());
        assert_eq!((key, origin), ("listen.api", Source::Env("ETHER_LISTEN_API".into())));
        assert!(msg.contains("IP:PORT"), "{msg}");

        let args = ServeArgs { config: Some(fx.file("[listen]\nadmin = \"127.0.0.1\"\n")), ..fx.args() };
        assert_eq!(invalid(Config::load(&args, no_env()).unwrap_err()).0, "listen.admin");

        let err = Config::load(&fx.args(), env(&[("ETHER_AUTH_API_KEY", "short")])).unwrap_err();
        assert_eq!(err.to_string(), "auth.api_key (from env ETHER_AUTH_API_KEY): must be at least 16 bytes, got 5");
        assert!(!err.to_string().contains("short\""), "secret values are not echoed");

        for (var, value, key) in [
            ("ETHER_RETENTION_DAYS", "0", "retention.days"),
            ("ETHER_RETENTION_DAYS", "3651", "retention.days"),
            ("ETHER_LIMITS_FRAME_BYTES_MAX", "0", "limits.frame_bytes_max"),
            ("ETHER_LIMITS_OUTBOUND_QUEUE_BYTES_MAX", "2048", "limits.outbound_queue_bytes_max"),
            ("ETHER_LIMITS_SYNC_PAGE_MAX", "0", "limits.sync_page_max"),
            ("ETHER_LOG_FORMAT", "xml", "log.format"),
            ("ETHER_CLUSTER_REDIS_URL", "http://redis:6379", "cluster.redis_url"),
            ("ETHER_EVENTS_WEBHOOK_URL", "https://h.example/x", "events.webhook_url"),
            ("ETHER_NODE_ID", "bad id!", "node.id"),
            ("ETHER_CLUSTER_NODE_ID", "", "none"),
        ] {
            let result = Config::load(&fx.args(), env(&[(var, value)]));
            if key == "none" {
                assert!(result.is_ok(), "{var}={value:?} is accepted");
                continue;
            }
            let (got, origin, _) = invalid(result.unwrap_err());
            assert_eq!((got, origin), (key, Source::Env(var.into())), "{var}={value}");
        }
    }

    #[test]
    fn node_id_alias() {
        let fx = Fixture::new();
        let file = fx.file("[cluster]\nnode_id = \"from-file\"\n");
        let args = ServeArgs { config: Some(file.clone()), ..fx.args() };
        assert_eq!(Config::load(&args, no_env()).unwrap().node.id, "from-file");

        let with_env = env(&[("ETHER_NODE_ID", "from-env")]);
        assert_eq!(Config::load(&args, with_env).unwrap().node.id, "from-env", "env node.id beats file alias");

        let args = ServeArgs { node_id: Some("from-flag".into()), ..args };
        let with_env = env(&[("ETHER_CLUSTER_NODE_ID", "from-env")]);
        assert_eq!(Config::load(&args, with_env).unwrap().node.id, "from-flag");

        let args = ServeArgs { config: Some(fx.file("[node]\nid = \"a\"\n[cluster]\nnode_id = \"b\"\n")), ..fx.args() };
        let (key, _, msg) = invalid(Config::load(&args, no_env()).unwrap_err());
        assert_eq!(key, "node.id");
        assert!(msg.contains("conflicts with cluster.node_id"), "{msg}");
    }

    #[test]
    fn webhook_and_redis() {
        let fx = Fixture::new();
        let config = Config::load(
            &ServeArgs { redis: Some("redis://:hunter2hunter2@r.example:6379/0".into()), ..fx.args() },
            env(&[
                ("ETHER_EVENTS_WEBHOOK_URL", "https://user:pw@hooks.example/e?x=1"),
                ("ETHER_EVENTS_WEBHOOK_SECRET", "webhook-secret-0123456789"),
            ]),
        )
        .unwrap();
        assert_eq!(config.cluster.redis_url.as_deref(), Some("redis://:hunter2hunter2@r.example:6379/0"));
        let webhook = config.events.webhook.as_ref().unwrap();
        assert_eq!(webhook.secret.expose(), "webhook-secret-0123456789");
        let json = config.redacted_json();
        assert_eq!(json["cluster"]["redis_url"], "redis://***@r.example:6379/0");
        assert_eq!(json["events"]["webhook_url"], "https://***@hooks.example/e?x=1");
        assert_eq!(json["events"]["webhook_secret"], "***");
        let text = json.to_string();
        assert!(!text.contains("hunter2") && !text.contains("webhook-secret"), "{text}");
    }

    #[test]
    fn configured_secret_wins_over_stored() {
        let fx = Fixture::new();
        let first = Config::load(&fx.args(), no_env()).unwrap();
        let env = env(&[("ETHER_AUTH_JWT_SECRET", "operator-chosen-jwt-secret")]);
        let config = Config::load(&fx.args(), env).unwrap();
        assert!(config.secrets_generated.is_empty());
        assert_eq!(config.auth.jwt_secret.expose(), "operator-chosen-jwt-secret");
        assert_eq!(config.auth.api_key.expose(), first.auth.api_key.expose());
        let stored = fs::read_to_string(Secrets::path(&fx.data())).unwrap();
        assert!(!stored.contains("operator-chosen"));
    }

    #[test]
    fn redacted_json_mirrors_every_key_and_hides_secrets() {
        let fx = Fixture::new();
        let config = Config::load(&fx.args(), no_env()).unwrap();
        let json = config.redacted_json();
        for key in RawConfig::KEYS {
            let (section, name) = key.split_once('.').unwrap();
            assert!(json[section].get(name).is_some(), "{key} missing from redacted_json");
        }
        let text = json.to_string();
        for secret in [&config.auth.jwt_secret, &config.auth.api_key, &config.auth.admin_token] {
            assert!(!text.contains(secret.expose()), "secret leaked: {text}");
        }
        assert_eq!(json["auth"]["api_key"], "***");
        assert_eq!(json["limits"]["handshake_timeout_ms"], 5000);
        assert_eq!(json["listen"]["client"], "0.0.0.0:9000");
        assert!(!format!("{config:?}").contains(config.auth.jwt_secret.expose()), "Debug redacts too");
    }

    #[test]
    fn test_min_is_tiny_and_valid() {
        let config = Config::test_min(PathBuf::from("/nonexistent/test-data"));
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            config.listen,
            Listen { client: local, api: local, admin: local, client_tls: None, api_tls: None, admin_tls: None }
        );
        assert_eq!(config.node.shards, 2);
        let l = config.limits;
        assert_eq!(l.frame_bytes_max, 4096);
        assert_eq!(l.terminals_per_user_max, 3);
        assert_eq!(l.outbound_queue_bytes_max, 16 * 1024);
        assert_eq!(l.handshake_timeout, Duration::from_secs(1));
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        assert_eq!(l.heartbeat_s, 1);
        assert_eq!(l.http_header_bytes_max, 2048);
        assert_eq!(l.http_body_bytes_max, 64 * 1024);
        assert_eq!(l.protocol_violations_max, 3);
        assert!(l.sync_page_max < Limits::default().sync_page_max);
        assert!(config.secrets_generated.is_empty());
        assert!(config.auth.api_key.matches(b"test-api-key-0123456789abcdef"));
        assert!(!Path::new("/nonexistent/test-data").exists(), "test_min touches no file");
    }

    #[test]
    fn every_bound_is_used_and_defaults_fit() {
        for (key, min, max) in LIMIT_BOUNDS {
            assert!(RawConfig::KEYS.contains(key), "{key}");
            assert!(min <= max, "{key}");
        }
        let json = Config::test_min(PathBuf::from("t")).redacted_json();
        let defaults = {
            let layers = Layers(vec![Layer { kind: LayerKind::Code("test"), raw: RawConfig::default() }]);
            let p = Prepared::from_layers(&layers).unwrap();
            let auth = Config::test_min(PathBuf::from("t")).auth;
            p.into_config(auth, Vec::new()).redacted_json()
        };
        for key in RawConfig::KEYS.iter().filter(|k| k.starts_with("limits.")) {
            let (section, name) = key.split_once('.').unwrap();
            assert!(json[section][name].is_u64(), "{key} is an integer in JSON");
            assert!(LIMIT_BOUNDS.iter().any(|(k, _, _)| k == key), "{key} has bounds");
            // 0 means "the kernel's own size" for the socket buffer: any test size is smaller.
            let unlimited_by_default = *key == "limits.socket_send_buffer_bytes";
            // Terminal rates are higher in tests (they send as fast as they can); the rate
            // limits' own tests set them low.
            let rate = key.starts_with("limits.terminal_") && (key.ends_with("_per_s") || key.ends_with("_burst"));
            assert!(
                unlimited_by_default || rate || defaults[section][name].as_u64() >= json[section][name].as_u64(),
                "{key}: test_min is not larger than default"
            );
        }
        for (key, _) in FLAGS {
            assert!(RawConfig::KEYS.contains(key), "{key}");
        }
    }

    /// `--set KEY=VALUE` reaches every key (API.md: every key overridable by CLI flags): over
    /// env and file, under the named flags; unknown keys and bad values are refused by name.
    #[test]
    fn set_flags_reach_every_key() {
        let fx = Fixture::new();
        let set = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let args = ServeArgs {
            shards: Some(3),
            set: set(&[
                ("limits.frame_bytes_max", "131072"),
                ("node.shards", "2"),
                ("retention.days", "7"),
                ("events.batch_wait_ms", "0"),
                ("terminal.send_enabled", "false"),
            ]),
            ..fx.args()
        };
        let env = env(&[("ETHER_LIMITS_FRAME_BYTES_MAX", "16384"), ("ETHER_RETENTION_DAYS", "9")]);
        let config = Config::load(&args, env).unwrap();
        assert_eq!(config.limits.frame_bytes_max, 131_072, "--set beats env");
        assert_eq!(config.retention.days, 7);
        assert_eq!(config.events.batch_wait, Duration::ZERO);
        assert!(!config.terminal_send_enabled);
        assert_eq!(config.node.shards, 3, "a named flag beats --set");
        let layers = Layers::gather(&args, &|_| None).unwrap();
        assert_eq!(layers.origin("retention.days"), Source::Flag("--set"));
        assert_eq!(layers.origin("node.shards"), Source::Flag("--shards"));

        let unknown = ServeArgs { set: set(&[("limits.frame_bytes", "1")]), ..fx.args() };
        let err = Config::load(&unknown, no_env()).unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownSetKey { key, .. } if key == "limits.frame_bytes"), "{err}");
        assert!(err.to_string().ends_with("(did you mean `limits.frame_bytes_max`?)"), "{err}");
        let far = ServeArgs { set: set(&[("zzz.zzz", "1")]), ..fx.args() };
        let err = Config::load(&far, no_env()).unwrap_err().to_string();
        assert!(err.ends_with("(keys look like limits.frame_bytes_max)"), "{err}");
        let bad = ServeArgs { set: set(&[("limits.frame_bytes_max", "lots")]), ..fx.args() };
        let err = Config::load(&bad, no_env()).unwrap_err().to_string();
        assert!(err.contains("--set limits.frame_bytes_max") && err.contains("lots"), "{err}");
        let out_of_range = ServeArgs { set: set(&[("retention.days", "0")]), ..fx.args() };
        let (key, origin, _) = invalid(Config::load(&out_of_range, no_env()).unwrap_err());
        assert_eq!((key, origin), ("retention.days", Source::Flag("--set")));
    }

    #[test]
    fn flags_layer() {
        let args = ServeArgs {
            listen_admin: Some("127.0.0.1:1234".parse().unwrap()),
            log_format: Some("json".into()),
            redis: Some("redis://r".into()),
            ..ServeArgs::default()
        };
        let raw = RawConfig::from_serve_args(&args);
        assert_eq!(raw.listen.admin.as_deref(), Some("127.0.0.1:1234"));
        assert_eq!(raw.cluster.redis_url.as_deref(), Some("redis://r"));
        assert!(!raw.is_set("listen.client"));
        let layers = Layers(vec![Layer { kind: LayerKind::Flags, raw }]);
        assert_eq!(layers.origin("listen.admin"), Source::Flag("--listen-admin"));
        assert_eq!(layers.origin("listen.client"), Source::Default);
    }

    #[test]
    fn overlay_is_field_by_field() {
        let base = RawConfig::from_toml("[node]\nshards = 2\nid = \"a\"\n[log]\nlevel = \"warn\"\n").unwrap();
        let top = RawConfig::from_toml("[node]\nshards = 8\n").unwrap();
        let merged = base.overlay(top);
        assert_eq!(merged.node.shards, Some(8));
        assert_eq!(merged.node.id.as_deref(), Some("a"));
        assert_eq!(merged.log.level.as_deref(), Some("warn"));
    }

    /// A `log.level` the filter would not apply as written is refused, naming the key: a bare
    /// word that is no level (`warning` filtered to errors only, silently) or a bad directive.
    #[test]
    fn log_level_is_a_filter_the_node_applies() {
        let fx = Fixture::new();
        let load = |level: &str| Config::load(&ServeArgs { log_level: Some(level.into()), ..fx.args() }, no_env());
        for good in
            ["info", "WARN", "off", "info,ether_engine=debug", "ether_engine::shard=trace", " debug ", "[conn]=debug"]
        {
            assert!(load(good).is_ok(), "{good:?} is a filter");
        }
        for (bad, says) in [
            ("warning", "did you mean `warn`?"),
            ("inf", "did you mean `info`?"),
            ("verbose", "is not a level"),
            ("info,ether_engine=loud", "not a filter"),
            ("info,,errors", "did you mean `error`?"),
        ] {
            let (key, origin, message) = invalid(load(bad).unwrap_err());
            assert_eq!((key, origin), ("log.level", Source::Flag("--log-level")), "{bad}");
            assert!(message.contains(says), "{bad}: {message}");
        }
    }

    /// `tls.reload_check_s` without a TLS listener is refused like the certificate paths are,
    /// not dropped (an out-of-range value was not even checked).
    #[test]
    fn tls_reload_check_needs_a_tls_listener() {
        let fx = Fixture::new();
        for value in ["5", "999999"] {
            let err = Config::load(&fx.args(), env(&[("ETHER_TLS_RELOAD_CHECK_S", value)])).unwrap_err();
            let (key, origin, message) = invalid(err);
            assert_eq!((key, origin), ("tls.reload_check_s", Source::Env("ETHER_TLS_RELOAD_CHECK_S".into())));
            assert!(message.contains("no TLS listener"), "{message}");
        }
    }

    /// The kernel raises a slice under 100 µs to 100 µs silently: such a value is refused.
    #[test]
    fn sched_slice_is_zero_or_what_the_kernel_keeps() {
        let fx = Fixture::new();
        let load = |us: &str| Config::load(&fx.args(), env(&[("ETHER_NODE_SCHED_SLICE_US", us)]));
        for (us, want) in [("0", 0), ("100", 100), ("100000", 100_000)] {
            assert_eq!(load(us).unwrap().node.sched_slice, Duration::from_micros(want), "{us}");
        }
        for us in ["1", "50", "99", "100001"] {
            let (key, _, message) = invalid(load(us).unwrap_err());
            assert_eq!(key, "node.sched_slice_us");
            assert!(message.contains("100..=100000"), "{us}: {message}");
        }
    }

    /// The resend check runs on the shards' 250 ms tick: a timeout under it is refused (it
    /// was taken, and meant 250 ms).
    #[test]
    fn resend_timeout_is_at_least_a_tick() {
        let fx = Fixture::new();
        let load = |ms: &str| Config::load(&fx.args(), env(&[("ETHER_LIMITS_RESEND_TIMEOUT_MS", ms)]));
        assert_eq!(load("250").unwrap().limits.resend_timeout, Duration::from_millis(250));
        for ms in ["50", "249"] {
            let (key, _, message) = invalid(load(ms).unwrap_err());
            assert_eq!(key, "limits.resend_timeout_ms");
            assert!(message.contains("250..=600000"), "{ms}: {message}");
        }
    }

    #[test]
    fn env_typos_are_named_with_the_closest_variable() {
        let names = ["ETHER_NODE_SHARD", "ETHER_LOG", "ETHER_LIMITS_FRAME_BYTES_MAX", "ETHER_RING_DEPTH", "HOME"];
        let warnings = env_warnings(names);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("ETHER_LOG is not a configuration variable"), "{warnings:?}");
        assert!(warnings[0].contains("`ETHER_LOG_LEVEL`"), "{warnings:?}");
        assert!(
            warnings[1].contains("ETHER_NODE_SHARD ") && warnings[1].contains("`ETHER_NODE_SHARDS`"),
            "{warnings:?}"
        );
        assert!(env_warnings(["ETHER_ZZZZZZZZZZZZZZZZ"])[0].ends_with("is ignored"));
        assert!(env_warnings(OTHER_ENV_VARS).is_empty(), "variables read on purpose are not typos");
    }

    #[test]
    fn unknown_env_vars_are_spotted() {
        let names = ["ETHER_NODE_SHARDS", "ETHER_NODE_SHARD", "ETHER_CONFIG", "ETHER_ADMIN_ADDR", "PATH"];
        assert_eq!(RawConfig::unknown_env_vars(names), vec!["ETHER_NODE_SHARD".to_owned()]);
    }

    #[test]
    fn token_secret_never_generates() {
        let fx = Fixture::new();
        let args = TokenArgs {
            user: "u".into(),
            ttl: Duration::from_secs(60),
            device: None,
            config: None,
            data: Some(fx.data()),
        };
        let err = token_secret(&args, no_env()).unwrap_err();
        assert!(matches!(err, ConfigError::MissingSecret { key: "auth.jwt_secret", .. }), "{err}");
        assert!(err.to_string().contains("ETHER_AUTH_JWT_SECRET"), "{err}");
        assert!(!fx.data().exists());

        let served = Config::load(&fx.args(), no_env()).unwrap();
        assert_eq!(token_secret(&args, no_env()).unwrap().expose(), served.auth.jwt_secret.expose());
        let env = env(&[("ETHER_AUTH_JWT_SECRET", "env-jwt-secret-0123456")]);
        assert_eq!(token_secret(&args, env).unwrap().expose(), "env-jwt-secret-0123456");
    }

    #[test]
    fn admin_target_resolution() {
        let fx = Fixture::new();
        let args = AdminArgs {
            addr: None,
            token: None,
            ca: None,
            json: false,
            config: None,
            data: Some(fx.data()),
            command: crate::cli::AdminCommand::Stats,
        };
        assert!(matches!(
            admin_target(&args, no_env()).unwrap_err(),
            ConfigError::MissingSecret { key: "auth.admin_token", .. }
        ));

        let served = Config::load(&fx.args(), no_env()).unwrap();
        let target = admin_target(&args, no_env()).unwrap();
        assert_eq!(target.addr, "127.0.0.1:9002", "listen.admin when no ports.json");
        assert_eq!(target.token.expose(), served.auth.admin_token.expose());

        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        PortsFile {
            client: any,
            api: any,
            admin: "0.0.0.0:41234".parse().unwrap(),
            client_tls: None,
            api_tls: None,
            admin_tls: None,
        }
        .write(&fx.data())
        .unwrap();
        assert_eq!(admin_target(&args, no_env()).unwrap().addr, "127.0.0.1:41234", "ports.json, made connectable");

        let env_addr = env(&[("ETHER_ADMIN_ADDR", "h:1"), ("ETHER_AUTH_ADMIN_TOKEN", "env-admin-token-01234")]);
        let target = admin_target(&args, env_addr).unwrap();
        assert_eq!(target.addr, "h:1");
        assert_eq!(target.token.expose(), "env-admin-token-01234");

        let explicit = AdminArgs { addr: Some("x:2".into()), token: Some("t".into()), data: None, ..args };
        let target = admin_target(&explicit, env(&[("ETHER_NODE_SHARDS", "bad")])).unwrap();
        assert_eq!((target.addr.as_str(), target.token.expose()), ("x:2", "t"), "no config read when both are given");
    }

    #[test]
    fn helpers() {
        assert_eq!(redact_userinfo("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_userinfo("redis://u:p@h:6379/1"), "redis://***@h:6379/1");
        assert_eq!(redact_userinfo("https://h/p?a=b@c"), "https://h/p?a=b@c");
        assert_eq!(redact_userinfo("not a url"), "not a url");
        assert_eq!(connectable("[::]:5".parse().unwrap()), "[::1]:5".parse().unwrap());
        assert_eq!(connectable("10.0.0.1:5".parse().unwrap()), "10.0.0.1:5".parse().unwrap());
        assert_eq!(edit_distance("shardz", "shards"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(did_you_mean("zzzzzz", &["shards"]), "");
        assert!(valid_node_id("node-1.eu:a_b"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id(&"a".repeat(65)));
        assert!(valid_node_id(&default_node_id()));
    }
}
