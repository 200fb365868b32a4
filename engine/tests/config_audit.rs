//! The real `ether` binary's configuration surface: what an operator gets told on stderr about
//! environment variables, secret files and the log filter (nothing set is dropped unseen).
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRETS: &str = "jwt_secret = \"jwt-secret-0123456789abcdef\"\napi_key = \"api-key-0123456789abcdef\"\n\
                       admin_token = \"admin-token-0123456789abcdef\"\n";

/// `ether ARGS` with only the given env (no `ETHER_*` from the caller's environment).
fn ether(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ether"));
    cmd.args(args).env_clear().envs(env.iter().copied());
    cmd
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A misspelt variable is named with the one meant, even when the start fails for another
/// reason; variables read on purpose are not.
#[test]
fn misspelt_env_vars_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [("ETHER_NODE_SHARD", "2"), ("ETHER_RETENTION_DAYS", "0"), ("ETHER_RING_DEPTH", "64")];
    let out = ether(&["serve", "--data", data.to_str().unwrap()], &env).output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "ETHER_NODE_SHARD is not a configuration variable and is ignored (did you mean `ETHER_NODE_SHARDS`?)"
        ),
        "{err}"
    );
    assert!(err.contains("retention.days (from env ETHER_RETENTION_DAYS): must be in 1..=3650"), "{err}");
    assert!(!err.contains("ETHER_RING_DEPTH"), "{err}");
}

/// Secrets readable by other users are warned about, whether in `secrets.toml` or in the
/// config file, by the commands that read them (`ether token` here); private ones are not.
#[test]
fn secrets_readable_by_others_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let secrets = data.join("secrets.toml");
    let token = ["token", "--user", "zoe", "--data", data.to_str().unwrap()];

    write_mode(&secrets, SECRETS, 0o644);
    let out = ether(&token, &[]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("secrets file is readable by others; run chmod 600 on it"), "{err}");
    assert!(err.contains("secrets.toml"), "{err}");

    write_mode(&secrets, SECRETS, 0o600);
    let out = ether(&token, &[]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", stderr_of(&out));

    let config = dir.path().join("ether.toml");
    write_mode(&config, "[auth]\njwt_secret = \"from-the-config-file-0123\"\n", 0o640);
    let with_config = ["token", "--user", "zoe", "--config", config.to_str().unwrap()];
    let out = ether(&with_config, &[]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("config file holds secrets and is readable by others"), "{err}");
    assert!(err.contains("auth.jwt_secret") && !err.contains("from-the-config-file"), "{err}");

    write_mode(&config, "[auth]\njwt_secret = \"from-the-config-file-0123\"\n", 0o600);
    let out = ether(&with_config, &[]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", stderr_of(&out));
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--log-level` is the log filter (flag > env > file): an `ETHER_LOG` in the environment
/// neither overrides it nor goes unremarked; logs to a pipe carry no colour codes.
#[test]
fn the_log_level_flag_is_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let any = "127.0.0.1:0";
    let args =
        ["serve", "--shards", "1", "--log-level", "warn,ether_engine::node=info", "--data", data.to_str().unwrap()];
    let child = ether(&args, &[("ETHER_LOG", "trace")])
        .args(["--listen-client", any, "--listen-api", any, "--listen-admin", any])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut node = Node(child);
    let started = Instant::now();
    while !data.join("ports.json").exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "the node never wrote ports.json");
        assert!(node.0.try_wait().unwrap().is_none(), "the node exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    node.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(node.0.wait().unwrap().success(), "{err}");
    assert!(err.contains("ETHER_LOG is not a configuration variable"), "{err}");
    assert!(err.contains("listening"), "--log-level warn,ether_engine::node=info: {err}");
    assert!(!err.contains("DEBUG") && !err.contains("TRACE"), "ETHER_LOG=trace is not the filter: {err}");
    assert!(!err.contains('\x1b'), "no colour escape codes when stderr is not a terminal: {err:?}");
}

/// A key whose feature is off is not dropped unseen: `events.webhook_secret` or
/// `events.webhook_ca_path` without `events.webhook_url` is warned about (these warnings are
/// made while the configuration is read, before the node's logging exists).
#[test]
fn webhook_keys_without_a_webhook_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ether.toml");
    let toml = "[auth]\njwt_secret = \"from-the-config-file-0123\"\n[events]\nwebhook_ca_path = \"/etc/ca.pem\"\n";
    write_mode(&config, toml, 0o600);
    let out = ether(&["token", "--user", "zoe", "--config", config.to_str().unwrap()], &[]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("events.webhook_ca_path is set but events.webhook_url is not"), "{err}");

    let env = [("ETHER_EVENTS_WEBHOOK_SECRET", "webhook-secret-0123456789")];
    let out = ether(&["token", "--user", "zoe", "--config", config.to_str().unwrap()], &env).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("events.webhook_secret is set but events.webhook_url is not"),
        "{}",
        stderr_of(&out)
    );
}
