//! The Stork appliance: DHCP, HTTP boot, the API and machine state in one daemon.
//!
//! `main.rs` only parses the command line; everything else lives here so tests and fuzz
//! targets reach it.

#[macro_use]
mod counters;

pub mod agent_kernels;
pub mod auth;
pub mod cli;
pub mod commissioning;
pub mod config;
pub mod dhcp;
pub mod dhcp6;
pub mod grub;
pub mod host;
pub mod http;
pub mod image_import;
pub mod image_kernels;
pub mod image_upload;
pub mod key_import;
pub mod lifecycle;
pub mod pins;
pub mod power;
pub mod ratelimit;
pub mod serve;
pub mod store;
pub mod supervise;
pub mod tftp;
pub mod ui;
