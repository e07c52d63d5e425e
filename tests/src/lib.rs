//! End-to-end tests of the whole stack live in `tests/tests/`; this library holds
//! their shared fixtures.
