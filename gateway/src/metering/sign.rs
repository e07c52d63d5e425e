//! The webhook signature: `sha256=<lowercase hex HMAC-SHA256 of the exact body>`, keyed
//! by the secret file's contents (trailing newline trimmed), as OpenFaaS does.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `X-Openfaas-Signature-256` value for `body`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Reads a secret file, trimming the trailing newline `openssl rand` and editors add.
pub fn read_secret(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
