//! The one integration-test binary: real HTTP on 127.0.0.1 (the mock bank
//! of the example, fixture servers and a verifying receiver), real stores
//! (sled in a temp dir; PostgreSQL where a test is about it) and the real
//! `pollhook` binary. One file per concern, grouped below; each file's
//! header says what it covers.

#[path = "../../examples/mock-bank/bank.rs"]
mod bank;
mod support;

// The guarantees and the examples, end to end.
mod bank_example;
mod crash;
mod delivery;
mod upstream_faults;
// The connector language and the catalog of connectors.
mod cassette;
mod catalog;
mod connectors;
mod discover;
mod language;
mod real_apis;
mod scaffold;
mod schedule;
// Politeness towards upstreams.
mod etiquette;
mod oauth;
mod polite;
// Delivery to endpoints.
mod delivery_policy;
// Hostile input, secrets and bounds.
mod depth;
mod hostile;
mod secrets;
// Configuration and the CLI.
mod cli;
mod config_errors;
// Running it: service, admin server, dashboard, metrics, reloads, events.
mod admin_access;
mod dashboard;
mod disk_full;
mod metrics;
mod opsevents;
mod reload;
mod service;
// Stores and clusters (PostgreSQL).
mod cluster;
mod postgres;
mod store_keys;
// The repository itself: documents and layers.
mod docs;
mod layers;
