//! UEFI's other boot paths, one test binary so that their two VMs run side by side (each
//! test has a lab of its own): Secure Boot through Debian's signed chain, and HTTP boot with
//! no PXE. (Firmware PXE is `deploy_uefi.rs`'s path.)

// The crate root's modules would be looked for beside it, where cargo takes every file
// for a test binary of its own.
#[path = "uefi_paths/http_boot.rs"]
mod http_boot;
#[path = "uefi_paths/secure_boot.rs"]
mod secure_boot;
