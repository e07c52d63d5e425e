//! `X-Openfaas-Signature-256` handling: HMAC-SHA256 of the exact body bytes, hex encoded.
//! Verification is constant time (`Mac::verify_slice`); the secret file's trailing newline is trimmed.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header prefix OpenFaaS uses before the hex digest.
pub const PREFIX: &str = "sha256=";

/// Why a signature was refused; each message is safe to return to the sender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing X-Openfaas-Signature-256 header")]
    Missing,
    #[error("X-Openfaas-Signature-256 must be `sha256=<hex>`")]
    Malformed,
    #[error("X-Openfaas-Signature-256 does not match the body (wrong secret or altered body)")]
    Mismatch,
}

/// The shared secret, as read from the secret file.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Builds a secret from the file's bytes, trimming trailing `\n`/`\r\n` like OpenFaaS.
    pub fn from_file_bytes(bytes: &[u8]) -> Self {
        let mut end = bytes.len();
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        Self(bytes[..end].to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this never fails.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// The full header value for `body`: `sha256=<lowercase hex>`.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        format!("{PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Checks a header value against `body` in constant time.
    pub fn verify(&self, header: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
        let header = header.ok_or(SignatureError::Missing)?;
        let hex_digest = header
            .strip_prefix(PREFIX.as_bytes())
            .ok_or(SignatureError::Malformed)?;
        let digest = hex::decode(hex_digest).map_err(|_| SignatureError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&digest)
            .map_err(|_| SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_trailing_newlines_only() {
        assert_eq!(Secret::from_file_bytes(b" s3cret\r\n\n").0, b" s3cret");
    }

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        let s = Secret::from_file_bytes(b"Jefe");
        assert_eq!(
            s.sign(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_cases() {
        let s = Secret::from_file_bytes(b"k\n");
        let good = s.sign(b"[]");
        assert_eq!(s.verify(Some(good.as_bytes()), b"[]"), Ok(()));
        assert_eq!(s.verify(None, b"[]"), Err(SignatureError::Missing));
        assert_eq!(
            s.verify(Some(b"md5=00"), b"[]"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            s.verify(Some(b"sha256=zz"), b"[]"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            s.verify(Some(good.as_bytes()), b"[ ]"),
            Err(SignatureError::Mismatch)
        );
        let other = Secret::from_file_bytes(b"other").sign(b"[]");
        assert_eq!(
            s.verify(Some(other.as_bytes()), b"[]"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            s.verify(Some(b"sha256="), b"[]"),
            Err(SignatureError::Mismatch)
        );
    }
}
