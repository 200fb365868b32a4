//! The node's own files in its data dir, `secrets.toml` (generated auth secrets, mode 0600) and
//! `ports.json` (bound addresses), with atomic writes; must not touch the store or other config.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize, Serializer};

/// Name of the generated secrets file inside the data dir.
pub const SECRETS_FILE: &str = "secrets.toml";
/// Name of the bound-addresses file inside the data dir.
pub const PORTS_FILE: &str = "ports.json";
/// Shortest secret accepted from any source, in bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest secret accepted from any source, in bytes.
pub const SECRET_BYTES_MAX: usize = 4096;
/// Random bytes in a generated secret (encoded as 43 base64url characters).
pub const GENERATED_SECRET_BYTES: usize = 32;
/// Largest data-dir file we agree to read; both files are tiny, anything bigger is not ours.
const DATA_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Tries at publishing a new secrets file when another process races us to create it.
const PUBLISH_ATTEMPTS_MAX: usize = 3;
/// Mode of `secrets.toml`.
const SECRETS_FILE_MODE: u32 = 0o600;
/// Mode of `ports.json` (not secret).
const PORTS_FILE_MODE: u32 = 0o644;
/// Mode of a data dir we create.
const DATA_DIR_MODE: u32 = 0o700;

/// A secret string: `Debug` and `Serialize` print `***`; derefs to `&str` (or use [`Secret::expose`]).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// A fresh secret: [`GENERATED_SECRET_BYTES`] random bytes from the OS, base64url, no padding.
    pub fn generate() -> Secret {
        let mut bytes = [0u8; GENERATED_SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Secret(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The secret value, for signing or for printing it once to the operator.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with a presented credential in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        ours.len() == candidate.len() && ours.iter().zip(candidate).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// The three auth secrets a running node needs, all present.
#[derive(Debug, Clone, Serialize)]
pub struct AuthSecrets {
    /// HS256 key for terminal JWTs.
    pub jwt_secret: Secret,
    /// Bearer key of the business API port.
    pub api_key: Secret,
    /// Bearer token of the admin port.
    pub admin_token: Secret,
}

/// Auth secrets as far as they are known (configured, or read from `secrets.toml`).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// HS256 key for terminal JWTs, if known.
    pub jwt_secret: Option<Secret>,
    /// Bearer key of the business API port, if known.
    pub api_key: Option<Secret>,
    /// Bearer token of the admin port, if known.
    pub admin_token: Option<Secret>,
}

/// A data-dir file could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum DataFileError {
    /// An I/O operation failed.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What we were doing, e.g. "read" or "create directory".
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file exists but its content is not acceptable; the message names the key.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, starting with the key when there is one.
        message: String,
    },
    /// Other processes kept creating the file while we tried to.
    #[error("{}: created concurrently by another process {PUBLISH_ATTEMPTS_MAX} times; try again", path.display())]
    Contended {
        /// The file.
        path: PathBuf,
    },
}

impl DataFileError {
    /// True when the file (or its directory) simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DataFileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Why a secret value is unacceptable, or `Ok`; `key` is its name (`api_key`, …).
pub fn validate_secret(key: &str, value: &str) -> Result<(), String> {
    if value.len() < SECRET_BYTES_MIN {
        return Err(format!("must be at least {SECRET_BYTES_MIN} bytes, got {}", value.len()));
    }
    if value.len() > SECRET_BYTES_MAX {
        return Err(format!("must be at most {SECRET_BYTES_MAX} bytes, got {}", value.len()));
    }
    // The API key and admin token travel in `Authorization: Bearer`; keep them header-safe.
    if key != "jwt_secret" && !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces (it is sent as a bearer token)".into());
    }
    Ok(())
}

/// On-disk shape of `secrets.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFileRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token: Option<String>,
}

impl Secrets {
    /// Path of `secrets.toml` in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(SECRETS_FILE)
    }

    /// All three secrets, if all are known.
    pub fn complete(&self) -> Option<AuthSecrets> {
        Some(AuthSecrets {
            jwt_secret: self.jwt_secret.clone()?,
            api_key: self.api_key.clone()?,
            admin_token: self.admin_token.clone()?,
        })
    }

    /// Reads `<data_dir>/secrets.toml` without creating anything; a missing file gives no secrets.
    pub fn read(data_dir: &Path) -> Result<Secrets, DataFileError> {
        let repr = read_secrets_file(&Secrets::path(data_dir))?.unwrap_or_default();
        Ok(Secrets {
            jwt_secret: repr.jwt_secret.map(Secret),
            api_key: repr.api_key.map(Secret),
            admin_token: repr.admin_token.map(Secret),
        })
    }

    /// Fills the secrets `configured` lacks from `<data_dir>/secrets.toml`, generating and
    /// storing (0600, atomically, data dir created 0700) those the file lacks too; configured
    /// values always win and are never written. Returns the keys generated now (print those
    /// secrets once). Touches no file when `configured` is complete.
    pub fn load_or_generate(
        data_dir: &Path,
        configured: &Secrets,
    ) -> Result<(AuthSecrets, Vec<&'static str>), DataFileError> {
        if let Some(all) = configured.complete() {
            return Ok((all, Vec::new()));
        }
        let path = Secrets::path(data_dir);
        for _ in 0..PUBLISH_ATTEMPTS_MAX {
            let stored = read_secrets_file(&path)?;
            let existed = stored.is_some();
            let mut file = stored.unwrap_or_default();
            let mut generated = Vec::new();
            for (key, known, slot) in [
                ("auth.jwt_secret", &configured.jwt_secret, &mut file.jwt_secret),
                ("auth.api_key", &configured.api_key, &mut file.api_key),
                ("auth.admin_token", &configured.admin_token, &mut file.admin_token),
            ] {
                if known.is_none() && slot.is_none() {
                    *slot = Some(Secret::generate().0);
                    generated.push(key);
                }
            }
            if !generated.is_empty() {
                create_data_dir(data_dir)?;
                let text = format!(
                    "# Generated by `ether serve`: the node's auth secrets. Keep this file private.\n\
                     # Values set in the config file, ETHER_AUTH_* env vars or flags win over these.\n{}",
                    toml::to_string(&file).map_err(|e| invalid(&path, e.to_string()))?
                );
                match publish(&path, text.as_bytes(), SECRETS_FILE_MODE, !existed) {
                    Ok(()) => {}
                    // Another process created the file first: use its secrets, not ours.
                    Err(e) if !existed && e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(io_error(&path, "write", e)),
                }
            }
            let pick =
                |known: &Option<Secret>, stored: &Option<String>| known.clone().or_else(|| stored.clone().map(Secret));
            let all = Secrets {
                jwt_secret: pick(&configured.jwt_secret, &file.jwt_secret),
                api_key: pick(&configured.api_key, &file.api_key),
                admin_token: pick(&configured.admin_token, &file.admin_token),
            }
            .complete()
            .expect("every missing secret was generated above");
            return Ok((all, generated));
        }
        Err(DataFileError::Contended { path })
    }
}

/// Reads and checks `secrets.toml`; `None` when it does not exist.
fn read_secrets_file(path: &Path) -> Result<Option<SecretsFileRepr>, DataFileError> {
    let Some(text) = read_small(path)? else {
        return Ok(None);
    };
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "secrets file is readable by others; run chmod 600 on it"
            );
        }
    }
    let repr: SecretsFileRepr = toml::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
    for (key, value) in
        [("jwt_secret", &repr.jwt_secret), ("api_key", &repr.api_key), ("admin_token", &repr.admin_token)]
    {
        if let Some(value) = value {
            validate_secret(key, value).map_err(|problem| invalid(path, format!("{key}: {problem}")))?;
        }
    }
    Ok(Some(repr))
}

/// The node's bound listener addresses, as written to `<data_dir>/ports.json` after binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsFile {
    /// Bound address of the client (WebSocket) listener.
    pub client: SocketAddr,
    /// Bound address of the business API listener.
    pub api: SocketAddr,
    /// Bound address of the admin listener.
    pub admin: SocketAddr,
    /// Bound address of the TLS client listener (`wss://`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<SocketAddr>,
    /// Bound address of the TLS API listener (`https://`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tls: Option<SocketAddr>,
    /// Bound address of the TLS admin listener (`https://`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls: Option<SocketAddr>,
}

impl PortsFile {
    /// Path of `ports.json` in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(PORTS_FILE)
    }

    /// Writes `<data_dir>/ports.json` atomically (temp file + rename), creating the dir if needed.
    pub fn write(&self, data_dir: &Path) -> Result<(), DataFileError> {
        let path = PortsFile::path(data_dir);
        let mut json = serde_json::to_vec(self).map_err(|e| invalid(&path, e.to_string()))?;
        json.push(b'\n');
        create_data_dir(data_dir)?;
        publish(&path, &json, PORTS_FILE_MODE, false).map_err(|e| io_error(&path, "write", e))
    }

    /// Reads `<data_dir>/ports.json`; see [`DataFileError::is_not_found`] for a node never started.
    pub fn read(data_dir: &Path) -> Result<PortsFile, DataFileError> {
        let path = PortsFile::path(data_dir);
        let text = read_small(&path)?.ok_or_else(|| io_error(&path, "read", io::ErrorKind::NotFound.into()))?;
        serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))
    }
}

fn io_error(path: &Path, action: &'static str, source: io::Error) -> DataFileError {
    DataFileError::Io { path: path.to_path_buf(), action, source }
}

fn invalid(path: &Path, message: String) -> DataFileError {
    DataFileError::Invalid { path: path.to_path_buf(), message }
}

/// Reads a whole small UTF-8 file; `None` when it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, DataFileError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, "open", e)),
    };
    let mut text = String::new();
    file.take(DATA_FILE_BYTES_MAX + 1).read_to_string(&mut text).map_err(|e| io_error(path, "read", e))?;
    if text.len() as u64 > DATA_FILE_BYTES_MAX {
        return Err(invalid(path, format!("larger than {DATA_FILE_BYTES_MAX} bytes")));
    }
    Ok(Some(text))
}

/// Creates the data dir (mode 0700, with parents) if it does not exist yet.
fn create_data_dir(dir: &Path) -> Result<(), DataFileError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(invalid(dir, "data dir path exists but is not a directory".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(DATA_DIR_MODE)
            .create(dir)
            .map_err(|e| io_error(dir, "create directory", e)),
        Err(e) => Err(io_error(dir, "inspect", e)),
    }
}

/// Writes `bytes` to a temp file beside `path` (created with `mode`), syncs it, then moves it
/// into place: by rename, or when `no_clobber` by hard link, failing with `AlreadyExists` if
/// `path` appeared meanwhile. Readers see the old file or the new one, never a partial one.
fn publish(path: &Path, bytes: &[u8], mode: u32, no_clobber: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        if no_clobber {
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)?;
        } else {
            fs::rename(&tmp, path)?;
        }
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What `ether serve` prints on the start that generated secrets (`generated`, as returned by
/// [`Secrets::load_or_generate`]): each generated secret, once, and a ready-to-copy token
/// command and `curl` send. Secrets the operator configured are never printed (the example then
/// names the api key's variable instead). `None` when nothing was generated.
pub fn first_start_note(generated: &[&str], auth: &AuthSecrets, data_dir: &Path, api: SocketAddr) -> Option<String> {
    if generated.is_empty() {
        return None;
    }
    let mut note = format!(
        "\nSecrets were generated and saved to {} (mode 0600). They are shown once:\n",
        Secrets::path(data_dir).display()
    );
    for key in generated {
        let secret = match *key {
            "auth.jwt_secret" => &auth.jwt_secret,
            "auth.api_key" => &auth.api_key,
            _ => &auth.admin_token,
        };
        note.push_str(&format!("  {key} = {}\n", secret.expose()));
    }
    let bearer = if generated.contains(&"auth.api_key") {
        auth.api_key.expose().to_owned()
    } else {
        "$ETHER_AUTH_API_KEY".to_owned()
    };
    note.push_str(&format!(
        "\nTry it:\n  ether token --user bob --data {}\n  curl -s -H \"Authorization: Bearer {bearer}\" -d '{{\"from\":\"alice\",\"to\":\"bob\",\"kind\":\"text\",\"body\":{{\"text\":\"hello\"}}}}' http://{api}/v1/messages\n",
        data_dir.display()
    ));
    Some(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn generated_once_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("nested/ether-data");

        let (first, generated) = Secrets::load_or_generate(&data, &Secrets::default()).unwrap();
        assert_eq!(generated, ["auth.jwt_secret", "auth.api_key", "auth.admin_token"]);
        assert_eq!(mode_of(&data), 0o700, "a data dir we create is private");
        assert_eq!(mode_of(&Secrets::path(&data)), 0o600);
        for s in [&first.jwt_secret, &first.api_key, &first.admin_token] {
            assert_eq!(s.expose().len(), 43, "32 bytes base64url without padding");
            assert!(!s.expose().contains('='));
            assert!(validate_secret("api_key", s.expose()).is_ok());
        }
        assert_ne!(first.jwt_secret.expose(), first.api_key.expose());
        assert_ne!(first.api_key.expose(), first.admin_token.expose());

        let (second, generated) = Secrets::load_or_generate(&data, &Secrets::default()).unwrap();
        assert!(generated.is_empty(), "second start must not generate again");
        assert_eq!(second.jwt_secret.expose(), first.jwt_secret.expose());
        assert_eq!(second.api_key.expose(), first.api_key.expose());
        assert_eq!(second.admin_token.expose(), first.admin_token.expose());
        assert_eq!(Secrets::read(&data).unwrap().api_key.unwrap().expose(), first.api_key.expose());
        assert!(leftovers(&data).is_empty());
    }

    #[test]
    fn configured_wins_and_is_never_written() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let configured = Secrets { jwt_secret: Some(Secret::new("configured-jwt-secret-0123")), ..Secrets::default() };
        let (all, generated) = Secrets::load_or_generate(data, &configured).unwrap();
        assert_eq!(generated, ["auth.api_key", "auth.admin_token"], "only what was missing is generated");
        assert_eq!(all.jwt_secret.expose(), "configured-jwt-secret-0123");
        let text = fs::read_to_string(Secrets::path(data)).unwrap();
        assert!(!text.contains("configured-jwt-secret"), "configured secrets stay out of the file");
        assert!(!text.contains("jwt_secret"));

        // The file now holds the other two; a later configured api_key beats the stored one.
        let stored = Secrets::read(data).unwrap();
        let configured = Secrets {
            jwt_secret: Some(Secret::new("configured-jwt-secret-0123")),
            api_key: Some(Secret::new("configured-api-key-456789")),
            admin_token: None,
        };
        let (all, generated) = Secrets::load_or_generate(data, &configured).unwrap();
        assert!(generated.is_empty());
        assert_eq!(all.api_key.expose(), "configured-api-key-456789");
        assert_eq!(all.admin_token.expose(), stored.admin_token.unwrap().expose());

        // Dropping the configured jwt secret generates one and adds it to the existing file.
        let (all, generated) = Secrets::load_or_generate(data, &Secrets::default()).unwrap();
        assert_eq!(generated, ["auth.jwt_secret"]);
        assert_ne!(all.jwt_secret.expose(), "configured-jwt-secret-0123");
        assert_eq!(all.api_key.expose(), stored.api_key.unwrap().expose());
        assert_eq!(mode_of(&Secrets::path(data)), 0o600);
    }

    #[test]
    fn the_first_start_note_shows_what_was_generated_and_nothing_configured() {
        let auth = AuthSecrets {
            jwt_secret: Secret::new("jwt-jwt-jwt-jwt-jwt-0"),
            api_key: Secret::new("api-api-api-api-api-1"),
            admin_token: Secret::new("adm-adm-adm-adm-adm-2"),
        };
        let api: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let data = Path::new("/srv/ether");
        assert_eq!(first_start_note(&[], &auth, data, api), None, "nothing generated, nothing printed");

        let all = first_start_note(&["auth.jwt_secret", "auth.api_key", "auth.admin_token"], &auth, data, api).unwrap();
        for line in ["auth.jwt_secret = jwt-jwt", "auth.api_key = api-api", "auth.admin_token = adm-adm"] {
            assert!(all.contains(line), "{line} missing from {all}");
        }
        assert!(all.contains("ether token --user bob --data /srv/ether"));
        assert!(all.contains("Bearer api-api-api-api-api-1"), "{all}");
        assert!(all.contains("http://127.0.0.1:9001/v1/messages"));

        // The operator configured the api key: the others are shown, the api key never.
        let some = first_start_note(&["auth.jwt_secret", "auth.admin_token"], &auth, data, api).unwrap();
        assert!(some.contains("auth.admin_token = adm-adm") && some.contains("auth.jwt_secret = jwt-jwt"), "{some}");
        assert!(!some.contains("api-api"), "a configured secret is never printed: {some}");
        assert!(some.contains("Bearer $ETHER_AUTH_API_KEY"), "{some}");
    }

    #[test]
    fn fully_configured_touches_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("never-created");
        let configured = Secrets {
            jwt_secret: Some(Secret::new("a".repeat(16))),
            api_key: Some(Secret::new("b".repeat(16))),
            admin_token: Some(Secret::new("c".repeat(16))),
        };
        let (all, generated) = Secrets::load_or_generate(&data, &configured).unwrap();
        assert!(generated.is_empty());
        assert_eq!(all.admin_token.expose(), "c".repeat(16));
        assert!(!data.exists(), "no dir, no file when nothing is missing");
    }

    #[test]
    fn bad_secrets_file_is_an_error_naming_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let path = Secrets::path(tmp.path());
        fs::write(&path, "api_key = \"short\"\n").unwrap();
        let err = Secrets::load_or_generate(tmp.path(), &Secrets::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("api_key") && msg.contains("at least 16"), "{msg}");
        assert!(msg.contains("secrets.toml"), "{msg}");

        fs::write(&path, "api_keys = \"0123456789abcdef0\"\n").unwrap();
        let msg = Secrets::read(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("api_keys"), "{msg}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "api_keys = \"0123456789abcdef0\"\n",
            "a broken file is reported, never overwritten"
        );
    }

    #[test]
    fn racing_first_starts_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("race");
        let keys: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| Secrets::load_or_generate(&data, &Secrets::default()).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap().0.jwt_secret.expose().to_owned()).collect()
        });
        assert!(keys.iter().all(|k| k == &keys[0]), "every racer ends with the published secret");
        assert!(leftovers(&data).is_empty());
    }

    #[test]
    fn missing_file_reads_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Secrets::read(&tmp.path().join("nope")).unwrap();
        assert!(s.jwt_secret.is_none() && s.api_key.is_none() && s.admin_token.is_none());
        assert!(s.complete().is_none());
    }

    #[test]
    fn secret_redacts_and_compares() {
        let s = Secret::new("super-secret-value-42");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert!(s.matches(b"super-secret-value-42"));
        assert!(!s.matches(b"super-secret-value-43"));
        assert!(!s.matches(b"super-secret-value-4"));
        assert!(!s.matches(b""));
        let as_str: &str = &s;
        assert_eq!(as_str, "super-secret-value-42");
        assert_eq!(s.as_bytes(), b"super-secret-value-42");
        assert_ne!(Secret::generate().expose(), Secret::generate().expose());
    }

    #[test]
    fn secret_rules() {
        assert!(validate_secret("jwt_secret", "0123456789abcdef").is_ok());
        assert!(validate_secret("jwt_secret", "0123456789abcde").is_err());
        assert!(validate_secret("jwt_secret", "with spaces is fine here").is_ok());
        assert!(validate_secret("api_key", "with spaces is not fine").is_err());
        assert!(validate_secret("admin_token", &"x".repeat(SECRET_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn ports_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("d");
        let err = PortsFile::read(&data).unwrap_err();
        assert!(err.is_not_found(), "{err}");

        let ports = PortsFile {
            client_tls: None,
            api_tls: None,
            admin_tls: None,
            client: "127.0.0.1:9000".parse().unwrap(),
            api: "127.0.0.1:43117".parse().unwrap(),
            admin: "[::1]:9002".parse().unwrap(),
        };
        ports.write(&data).unwrap();
        let text = fs::read_to_string(PortsFile::path(&data)).unwrap();
        assert_eq!(text, "{\"client\":\"127.0.0.1:9000\",\"api\":\"127.0.0.1:43117\",\"admin\":\"[::1]:9002\"}\n");
        assert_eq!(PortsFile::read(&data).unwrap(), ports);

        let moved = PortsFile { api: "127.0.0.1:1".parse().unwrap(), ..ports };
        moved.write(&data).unwrap();
        assert_eq!(PortsFile::read(&data).unwrap(), moved, "rewrite replaces");
        assert!(leftovers(&data).is_empty());

        fs::write(PortsFile::path(&data), "{\"client\":1}").unwrap();
        let err = PortsFile::read(&data).unwrap_err();
        assert!(!err.is_not_found());
        assert!(err.to_string().contains("ports.json"), "{err}");
    }

    #[test]
    fn no_clobber_publish_refuses_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        publish(&path, b"one", 0o600, true).unwrap();
        let err = publish(&path, b"two", 0o600, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert!(leftovers(tmp.path()).is_empty(), "temp file removed on failure");
        publish(&path, b"three", 0o600, false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
    }
}
