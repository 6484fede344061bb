//! Delivery: signing and retry policy are pure ([`sign`], [`retry`]); the
//! [`worker`] drives one endpoint's outbox.

pub mod guard;
pub mod policy;
pub mod retry;
pub mod sign;
pub mod worker;
