//! Integration tests of the control service: store (SQLite and PostgreSQL), REST API, node hub.

// Tests may unwrap: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod api;
mod common;
mod idempotency;
mod lists;
mod oauth;
mod openapi;
mod store;
mod tenants;
mod ui;
mod upgrade;
mod ws;
