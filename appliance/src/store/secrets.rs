//! Secrets at rest: BMC passwords (every power parameter the API redacts) are sealed with
//! AES-256-GCM before they reach the database, under a key kept in its own file.
//!
//! The key file is 32 random bytes written as 64 hex digits, created `0600` at the first
//! start. Its default place is beside the database (`DATA_DIR/secrets.key`); the
//! `STORK_SECRETS_KEY` environment variable names another, which may be on another disk (a
//! separate volume, removable media): then a copy of the database alone (a backup, a disk
//! taken away) holds no usable password. Losing the key loses the stored passwords, nothing
//! else: the machines' power parameters must then be set again.
//!
//! A sealed value is the JSON string `enc:v1:<hex of nonce || ciphertext || tag>`, with a
//! random 96-bit nonce per value and the machine id and parameter name as associated data,
//! so a sealed value copied to another machine or parameter does not open. The sealed
//! plaintext is the value's JSON text, so any JSON value seals.
//!
//! Databases of older versions hold clear passwords: [`super::Store::open`] seals them once.
//! A database with sealed values and no key file is refused with the file's name, and so is
//! a key that does not open them: never garbage passed on to a BMC.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::TryRngCore;

/// Environment variable naming the key file (default: `secrets.key` beside the database).
pub const KEY_ENV: &str = "STORK_SECRETS_KEY";
/// The key file's name beside the database when [`KEY_ENV`] is not set.
pub const KEY_FILE_NAME: &str = "secrets.key";
/// How a sealed value starts (format version 1: AES-256-GCM, 96-bit nonce).
pub const SEALED_PREFIX: &str = "enc:v1:";

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "the database holds encrypted BMC passwords but their key file {path} is missing: \
         restore it (or set {KEY_ENV} to where it is)"
    )]
    KeyMissing { path: PathBuf },
    #[error("cannot read the secrets key file {path}")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets key file {path} is not a key: it must hold 64 hex digits")]
    KeyInvalid { path: PathBuf },
    #[error("cannot create the secrets key file {path}")]
    KeyCreate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the secrets key file {path} private to its owner")]
    KeyRestrict {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the {param} of machine {machine} does not decrypt with the key in {path}: the key \
         file is not the one it was encrypted with, or the value is damaged"
    )]
    WrongKey {
        path: PathBuf,
        machine: String,
        param: String,
    },
}

/// The key file for the database at `db`: [`KEY_ENV`] if set, else `secrets.key` beside it.
pub fn key_path_for(db: &Path) -> PathBuf {
    match std::env::var_os(KEY_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => db
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(KEY_FILE_NAME),
    }
}

/// Whether a stored parameter value is sealed (else it is a clear one from an older version).
pub fn is_sealed(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|s| s.starts_with(SEALED_PREFIX))
}

/// The key that seals and opens stored secrets, and the file it came from (for errors).
pub struct SecretKey {
    cipher: Aes256Gcm,
    path: PathBuf,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// The key in `path`, or `None` when there is no such file. A key file readable by
    /// others is made private to its owner.
    pub fn load(path: &Path) -> Result<Option<Self>, SecretsError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SecretsError::KeyRead {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mode = std::fs::metadata(path)
            .map_err(|source| SecretsError::KeyRead {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| SecretsError::KeyRestrict {
                    path: path.to_path_buf(),
                    source,
                },
            )?;
        }
        let invalid = || SecretsError::KeyInvalid {
            path: path.to_path_buf(),
        };
        let hex_text = std::str::from_utf8(&text).map_err(|_| invalid())?.trim();
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(hex_text, &mut key).map_err(|_| invalid())?;
        let me = Self::from_bytes(&key, path);
        key.fill(0);
        Ok(Some(me))
    }

    /// A new random key written to `path` (`0600`, whole or not at all). If another process
    /// created the file first, its key is the one used.
    pub fn create(path: &Path) -> Result<Self, SecretsError> {
        let create_err = |source| SecretsError::KeyCreate {
            path: path.to_path_buf(),
            source,
        };
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .map_err(|e| create_err(std::io::Error::other(e)))?;
        let mut text = hex::encode(key);
        text.push('\n');
        // Written under a temporary name, then linked into place: the key file is never
        // seen half written, and an existing one is never replaced.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        // SAFETY: zero bytes keep the String valid UTF-8.
        unsafe { text.as_bytes_mut().fill(0) };
        match written {
            Ok(()) => {
                if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(create_err)?;
                }
                let me = Self::from_bytes(&key, path);
                key.fill(0);
                Ok(me)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                key.fill(0);
                Self::load(path)?.ok_or_else(|| create_err(e))
            }
            Err(e) => Err(create_err(e)),
        }
    }

    fn from_bytes(key: &[u8; KEY_LEN], path: &Path) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad(machine: &str, param: &str) -> Vec<u8> {
        format!("stork secret v1\0{machine}\0{param}").into_bytes()
    }

    /// `value` sealed for parameter `param` of machine `machine`.
    pub fn seal(&self, machine: &str, param: &str, value: &serde_json::Value) -> serde_json::Value {
        let mut nonce = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut nonce);
        let mut plain = serde_json::to_vec(value).unwrap_or_default();
        let aad = Self::aad(machine, param);
        // Encryption fails only for inputs of gigabytes.
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        plain.fill(0);
        let mut out = String::with_capacity(SEALED_PREFIX.len() + 2 * (NONCE_LEN + sealed.len()));
        out.push_str(SEALED_PREFIX);
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(sealed));
        serde_json::Value::String(out)
    }

    /// The value [`SecretKey::seal`] sealed, if `sealed` is one, under this key, for this
    /// machine and parameter.
    pub fn open(
        &self,
        machine: &str,
        param: &str,
        sealed: &serde_json::Value,
    ) -> Result<serde_json::Value, SecretsError> {
        let wrong = || SecretsError::WrongKey {
            path: self.path.clone(),
            machine: machine.to_string(),
            param: param.to_string(),
        };
        let bytes = sealed
            .as_str()
            .and_then(|s| s.strip_prefix(SEALED_PREFIX))
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() >= NONCE_LEN + TAG_LEN)
            .ok_or_else(wrong)?;
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let aad = Self::aad(machine, param);
        let mut plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| wrong())?;
        let value = serde_json::from_slice(&plain).map_err(|_| wrong());
        plain.fill(0);
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seal_then_open_round_trips_and_binds_machine_and_param() {
        let dir = tempfile::tempdir().unwrap();
        let k = SecretKey::create(&dir.path().join("k")).unwrap();
        let v = json!("hunter2");
        let s1 = k.seal("m1", "password", &v);
        let s2 = k.seal("m1", "password", &v);
        assert!(is_sealed(&s1));
        // A random nonce per value: the same password seals differently each time.
        assert_ne!(s1, s2);
        assert!(!s1.as_str().unwrap().contains("hunter2"));
        assert_eq!(k.open("m1", "password", &s1).unwrap(), v);
        assert!(k.open("m2", "password", &s1).is_err());
        assert!(k.open("m1", "token", &s1).is_err());
        for bad in [json!("enc:v1:zz"), json!("enc:v1:00"), json!(5)] {
            assert!(matches!(
                k.open("m1", "password", &bad),
                Err(SecretsError::WrongKey { .. })
            ));
        }
    }

    #[test]
    fn the_key_file_is_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        assert!(SecretKey::load(&path).unwrap().is_none());
        let k = SecretKey::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let sealed = k.seal("m", "password", &json!("pw"));
        // Creating again keeps the existing key.
        let again = SecretKey::create(&path).unwrap();
        assert_eq!(again.open("m", "password", &sealed).unwrap(), json!("pw"));
        let loaded = SecretKey::load(&path).unwrap().unwrap();
        assert_eq!(loaded.open("m", "password", &sealed).unwrap(), json!("pw"));
        // A key file others could read is made private.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        SecretKey::load(&path).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "not a key\n").unwrap();
        let e = SecretKey::load(&path).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}
