//! Basic-auth credentials read like the gateway's: `basic-auth-user` and
//! `basic-auth-password` files under `secret_mount_path`.

use std::{fs, path::Path};

use base64::Engine as _;

/// A user and password for the gateway's system API.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// Reads both files; `None` if either is missing (the agent then sends no auth).
    pub fn from_dir(dir: &Path) -> Option<Self> {
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        Some(Self {
            user: read("basic-auth-user")?,
            password: read("basic-auth-password")?,
        })
    }

    /// The `Authorization` header value.
    pub fn header_value(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}
