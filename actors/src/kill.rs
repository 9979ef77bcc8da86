//! Chaos support: the `Kill` message every actor of the tree answers by dying as a crash would,
//! optionally by a panic raised inside its handler and caught there, so that it takes down that
//! actor only, as a real panic in a supervised actor would.

use actix::Message;

/// Every injected panic's message starts with this, so that a panic hook can tell them apart.
pub const INJECTED_PANIC_PREFIX: &str = "chaos: injected panic";

/// Die now, as a crash would: what the actor held in memory is lost, and the tree recovers it
/// (each actor's docs say how).
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct Kill {
    /// Die by a panic inside the handler rather than by stopping.
    pub panic: bool,
}

/// Panics inside `catch_unwind` with a message naming `whom`, if `kill` asks for a panic.
pub fn injected_panic(kill: Kill, whom: impl FnOnce() -> String) {
    if !kill.panic {
        return;
    }
    let message = format!("{INJECTED_PANIC_PREFIX} in {}", whom());
    let caught = std::panic::catch_unwind(move || panic!("{message}"));
    debug_assert!(caught.is_err());
}
