//! The x86_64 platform Ferrite presents to a guest.
//!
//! Pure, testable pieces: the memory map ([`layout`]) and everything derived from it.

pub mod layout;
