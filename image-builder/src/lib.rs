//! Builds what Stork boots and installs: a Debian kernel fetched with the host's apt, a small,
//! reproducible initrd whose `/init` is the Stork agent, the agent's ephemeral SquashFS root,
//! and deployable OS images (root SquashFS, root tar, raw GPT disk) from recipes; and writes a
//! disk image onto a USB stick or disk, checked and verified.

pub mod appliance;
pub mod archive;
pub mod blockmap;
pub mod cmd;
pub mod depmod;
pub mod disk;
pub mod ephemeral;
pub mod gpt;
pub mod grub;
pub mod image;
pub mod initrd;
pub mod kernel;
pub mod loaders;
pub mod manifest;
pub mod modinfo;
pub mod modules;
pub mod os;
pub mod progress;
pub mod recipe;
pub mod rootfs;
pub mod sources;
pub mod squashfs;
pub mod tarball;
pub mod write;
