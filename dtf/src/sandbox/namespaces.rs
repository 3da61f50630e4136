//! Linux namespaces for isolation level `full`.

/// Enters new namespaces from inside the child, before the test runs.
pub fn enter_in_child() -> Result<(), String> {
    Err("isolation level `full` is not available in this build".to_owned())
}

/// Checks, before any test starts, that this process may create the namespaces of level
/// `full`.
pub fn probe() -> Result<(), String> {
    Err("not available in this build".to_owned())
}
