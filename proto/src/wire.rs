//! Typed values both sides name on the wire: where a deploy goes, what an image file is
//! for, and the agent's steps. Steps and roles read unknown names into `Other` rather than
//! failing, so an appliance and an agent of different versions still understand each
//! other's messages.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a deploy puts the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployTarget {
    /// Install to a disk and boot from it.
    #[default]
    Disk,
    /// Run from RAM (SquashFS under a tmpfs overlay); no disk touched.
    Memory,
}

impl DeployTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disk => "disk",
            Self::Memory => "memory",
        }
    }
}

impl fmt::Display for DeployTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defines a string-named enum with an `Other(String)` catch-all: (de)serialised as its
/// name, displayed as its name.
macro_rules! named {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            /// A name this build does not know.
            Other(String),
        }

        impl $name {
            pub const KNOWN: &[$name] = &[$($name::$variant),*];

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => $name::$variant,)*
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// A string: the known names are examples, any other is read as `Other`.
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .examples([$($text),*])
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

named! {
    /// What a boot resource's file is for.
    ImageRole {
        /// A compressed raw GPT disk image: streamed onto the disk.
        Raw = "raw",
        /// The raw image's block map (`stork_proto::blockmap`): its data ranges and frames.
        DiskMap = "disk-map",
        /// The OS root as SquashFS: run from RAM.
        Squashfs = "squashfs",
        /// The OS root as a compressed tar: installed by partitioning and extracting.
        Tar = "tar",
        Kernel = "kernel",
        Initrd = "initrd",
    }
}

named! {
    /// The agent's steps, named as they appear on the console, in events and heartbeats.
    AgentStep {
        Mount = "mount",
        LoadModules = "load-modules",
        Cmdline = "cmdline",
        Network = "network",
        /// Stage 1: fetch, check and mount the ephemeral root.
        Ephemeral = "ephemeral",
        /// Stage 1 hands over to stage 2 inside the ephemeral root.
        SwitchRoot = "switch-root",
        Inventory = "inventory",
        Enlist = "enlist",
        Task = "task",
        Commission = "commission",
        /// Deploy: choose and wipe the target disk.
        Disk = "disk",
        /// Deploy: stream the image onto it.
        Image = "image",
        /// Deploy: re-read, grow and find the root partition.
        Partitions = "partitions",
        /// Deploy: write the cloud-init seed and phone-home.
        Seed = "seed",
        /// Deploy: tell the appliance the image is installed.
        Installed = "installed",
        /// Release: wipe the disks.
        Erase = "erase",
        /// Deploy in memory: fetch, mount and hand over to the OS.
        Memory = "memory",
        /// Deploy: the installed disk's UEFI boot entry.
        BootEntry = "boot-entry",
        /// Deploy from the root tar: fstab, grub.cfg, GRUB for BIOS and UEFI.
        Bootloader = "bootloader",
    }
}

impl Default for AgentStep {
    fn default() -> Self {
        Self::Other(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for s in AgentStep::KNOWN {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(serde_json::from_str::<AgentStep>(&json).unwrap(), *s);
        }
        let later: AgentStep = serde_json::from_str("\"firmware-update\"").unwrap();
        assert_eq!(later, AgentStep::Other("firmware-update".into()));
        assert_eq!(
            serde_json::to_string(&later).unwrap(),
            "\"firmware-update\""
        );
        assert_eq!(AgentStep::LoadModules.to_string(), "load-modules");
        let role: ImageRole = serde_json::from_str("\"tar\"").unwrap();
        assert_eq!(role, ImageRole::Tar);
        assert_eq!(
            serde_json::to_string(&DeployTarget::Memory).unwrap(),
            "\"memory\""
        );
    }
}
