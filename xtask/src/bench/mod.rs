//! `cargo xtask bench <what>`: benchmarks against peer implementations, in namespaces of
//! their own. They print numbers; they never assert on time.

mod api;
mod deploy;
mod dhcp;
mod images;
mod tftp;

use anyhow::{Result, bail};

pub fn run(what: &str) -> Result<()> {
    match what {
        "api" => api::run(),
        "tftp" => tftp::run(),
        "dhcp" => dhcp::run(),
        "images" => images::run(),
        "deploy" => deploy::run(),
        other => bail!("unknown benchmark `{other}` (known: api, tftp, dhcp, images, deploy)"),
    }
}
