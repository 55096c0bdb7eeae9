//! Builds what Stork boots: a Debian kernel fetched with the host's apt, and a small,
//! reproducible initrd whose `/init` is the Stork agent.

pub mod archive;
pub mod depmod;
pub mod initrd;
pub mod kernel;
pub mod manifest;
pub mod modinfo;
pub mod modules;
