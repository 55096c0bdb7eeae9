//! `stork-sim`: a fleet of simulated machines and their BMCs on one L2 segment, each host
//! with its own MAC and address on a userspace TCP/IP stack (smoltcp), all in one process.
//! Each machine behaves on the wire as its firmware, iPXE and Stork's agent would; each BMC
//! is a Redfish service Stork powers it through. The run's report says how long each phase
//! took over the fleet and what failed, and why.
//!
//! Modules: `tap` (the one device), `net` (hosts on it, async sockets), `firmware` (DHCP,
//! TFTP), `http` (hyper over smoltcp, TLS pinned), `machine` (power, boot, the agent),
//! `bmc` (Redfish), `fleet` (the fleet and the operator), `report` (JSON, SVG); and
//! `dhcp_load`, the DHCP benchmark's batching load client (its own binary, on a kernel socket).

pub mod bmc;
pub mod dhcp_load;
pub mod firmware;
pub mod fleet;
pub mod http;
pub mod machine;
pub mod net;
pub mod report;
pub mod tap;
