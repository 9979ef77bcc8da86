//! Chaos support: a panic raised on purpose inside an actor's handler and caught there, so that
//! it takes down that actor only, as a real panic in a supervised actor would.

/// Every injected panic's message starts with this, so that a panic hook can tell them apart.
pub const INJECTED_PANIC_PREFIX: &str = "chaos: injected panic";

/// Panics inside `catch_unwind` with a message naming `whom`.
pub fn injected_panic(whom: &str) {
    let message = format!("{INJECTED_PANIC_PREFIX} in {whom}");
    let caught = std::panic::catch_unwind(move || panic!("{message}"));
    debug_assert!(caught.is_err());
}
