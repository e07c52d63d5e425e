//! Idempotent installation of what the stack and the tests need.

use anyhow::Result;

pub fn ensure_all() -> Result<()> {
    Ok(())
}
