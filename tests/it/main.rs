//! The one integration-test binary: real HTTP on 127.0.0.1 (the mock bank
//! of the example and a verifying receiver), a real sled store in a temp
//! dir, and the real `pollhook` binary.

#[path = "../../examples/mock-bank/bank.rs"]
mod bank;
mod support;

mod admin_access;
mod bank_example;
mod cassette;
mod catalog;
mod cli;
mod cluster;
mod config_errors;
mod connectors;
mod crash;
mod dashboard;
mod delivery;
mod delivery_policy;
mod depth;
mod discover;
mod disk_full;
mod docs;
mod etiquette;
mod hostile;
mod language;
mod layers;
mod metrics;
mod oauth;
mod operations;
mod polite;
mod postgres;
mod real_apis;
mod reload;
mod scaffold;
mod schedule;
mod secrets;
mod service;
mod store_keys;
mod upstream_faults;
