//! The means of the tasks and of stage 1's ephemeral root: image files over HTTP ([`http`],
//! [`download`], [`prefetch`]) streamed onto a sink ([`stream`]; with a block map,
//! [`mapped`]), block devices ([`block`]),
//! NVMe secure erase ([`nvme`]), roots in RAM ([`ramroot`]), UEFI boot entries ([`efi`]), the
//! installed OS's kernel ([`kernel`]) and
//! the cloud-init seed ([`seed`]). Nothing here names a step or posts to the appliance.

pub mod block;
pub mod download;
pub mod efi;
pub mod http;
pub mod kernel;
pub mod late;
pub mod mapped;
pub mod network;
pub mod nvme;
pub mod prefetch;
pub mod ramroot;
pub mod seed;
pub mod stream;
