//! The eBPF object built from `agent-ebpf` by the build script and embedded in the binary.
//! An empty object means the build had no eBPF toolchain: loading then fails loudly.

use crate::error::Error;

/// The embedded object, 8-byte aligned as aya requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// The real eBPF object, or [`Error::NoEbpfObject`] when this build only has the stub.
pub fn object() -> Result<&'static [u8], Error> {
    if OBJECT.is_empty() {
        Err(Error::NoEbpfObject)
    } else {
        Ok(OBJECT)
    }
}

/// Whether this build carries the real object (tests check it before measuring anything).
pub fn is_real() -> bool {
    !OBJECT.is_empty()
}
