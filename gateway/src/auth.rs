//! Admin credentials for /system routes: read from `secret_mount_path`
//! (`basic-auth-user`, `basic-auth-password`), generated on first start when absent,
//! and checked in constant time.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use subtle::ConstantTimeEq;

pub const USER_FILE: &str = "basic-auth-user";
pub const PASSWORD_FILE: &str = "basic-auth-password";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading credential file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing credential file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credential file {0} is empty")]
    Empty(PathBuf),
}

/// The admin user and password. Debug output never shows the password.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
        }
    }

    /// Reads both files from `dir`, trimming surrounding white space.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        let read = |name: &str| {
            let path = dir.join(name);
            let text = fs::read_to_string(&path).map_err(|source| AuthError::Read {
                path: path.clone(),
                source,
            })?;
            let text = text.trim().to_string();
            if text.is_empty() {
                return Err(AuthError::Empty(path));
            }
            Ok(text)
        };
        Ok(Self::new(read(USER_FILE)?, read(PASSWORD_FILE)?))
    }

    /// Loads the files from `dir`, first writing `admin` and a random password there
    /// (mode 0600) if the password file does not exist. Returns whether it generated.
    pub fn load_or_generate(dir: &Path) -> Result<(Self, bool), AuthError> {
        let password_path = dir.join(PASSWORD_FILE);
        let mut generated = false;
        if !password_path.exists() {
            let write_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| AuthError::Write { path, source }
            };
            fs::create_dir_all(dir).map_err(write_err(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(write_err(dir))?;
            let mut raw = [0u8; 24];
            rand::rng().fill_bytes(&mut raw);
            let password = STANDARD.encode(raw);
            write_secret(&dir.join(USER_FILE), "admin").map_err(write_err(dir))?;
            write_secret(&password_path, &password).map_err(write_err(&password_path))?;
            generated = true;
        }
        Ok((Self::load(dir)?, generated))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Checks an `Authorization` header value in constant time (per credential).
    pub fn check_header(&self, header: Option<&[u8]>) -> bool {
        let Some(value) = header else { return false };
        let Some(encoded) = value.strip_prefix(b"Basic ") else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(encoded.trim_ascii()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let user_ok = user.ct_eq(self.user.as_bytes());
        let password_ok = password.ct_eq(self.password.as_bytes());
        (user_ok & password_ok).into()
    }

    /// The `Authorization` header value for these credentials (for clients and tests).
    pub fn header_value(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.user, self.password))
        )
    }
}

fn write_secret(path: &Path, value: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(value.as_bytes())?;
    file.sync_all()?;
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, generated) = Credentials::load_or_generate(dir.path()).unwrap();
        assert!(generated);
        assert_eq!(first.user(), "admin");
        assert!(first.password().len() >= 24);
        let (second, generated) = Credentials::load_or_generate(dir.path()).unwrap();
        assert!(!generated);
        assert_eq!(first.password(), second.password());
        let mode = fs::metadata(dir.path().join(PASSWORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "password file readable by others");
    }

    #[test]
    fn header_checks() {
        let c = Credentials::new("admin", "s3cret");
        assert!(c.check_header(Some(c.header_value().as_bytes())));
        let wrong = Credentials::new("admin", "s3cres").header_value();
        assert!(!c.check_header(Some(wrong.as_bytes())));
        assert!(!c.check_header(None));
        assert!(!c.check_header(Some(b"Bearer x")));
        assert!(!c.check_header(Some(b"Basic !!!")));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
