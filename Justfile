# The same tasks as `cargo xtask`, for people who use just.

# Live: an appliance on its embedded default and a QEMU machine taken through enlist, commission and deploy.
demo:
    cargo xtask demo

# Every test, end-to-end included (needs root for the QEMU lab).
test *ARGS:
    cargo xtask test {{ARGS}}

# Install the Debian packages the lab needs.
deps:
    cargo xtask deps

# Build the static agent and the boot images into target/stork/boot.
images:
    cargo xtask images

# The appliance disk image (Debian, systemd, Stork, boot files, OS images) for a USB stick or disk.
appliance:
    cargo xtask appliance

# Rootless: the appliance image and a machine VM on one userspace segment; the API on 127.0.0.1:18443.
lab:
    cargo xtask lab

# Unit and in-process tests only (no root, no QEMU).
unit:
    cargo test --workspace

lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# TFTP benchmark: Stork against tftpd-hpa and dnsmasq in namespaces (needs root).
bench-tftp:
    cargo xtask bench tftp

# DHCP benchmark: perfdhcp against Stork, Kea and dnsmasq in namespaces (needs root).
bench-dhcp:
    cargo xtask bench dhcp

# DHCPv6 benchmark: perfdhcp -6 against Stork and Kea in namespaces (needs root).
bench-dhcp6:
    cargo xtask bench dhcp6

# Image builder benchmark: Stork's SquashFS writer against plain mksquashfs, initrd build time.
bench-images:
    cargo xtask bench images

# Machines API with 10,000 machines stored: list and show, requests/s, p50/p99.
bench-api:
    cargo xtask bench api

# A simulated fleet (stork-sim, 1,000 machines; STORK_FLEET_MACHINES sets it): a boot
# storm through Stork and through dnsmasq and nginx, then Redfish power, commission, deploy
# and release through Stork (needs root).
bench-fleet:
    cargo xtask bench fleet

# Deploy: a QEMU machine's power-on to Deployed, per phase, against its floor (needs root).
bench-deploy:
    cargo xtask bench deploy

# Only the layout deploy (RAID 1 + LVM from the root tar) beside its floor.
bench-deploy-layout:
    cargo xtask bench deploy-layout

# Web UI with 10,000 machines: the machines page's server time beside the API's, Chromium's
# time to first paint, and a status change until it is on screen.
bench-ui:
    cargo xtask bench ui

# Boot files over plain HTTP: a 512 MiB file from Stork and from nginx, one connection and
# 32 at once, in namespaces (needs root).
bench-http:
    cargo xtask bench http
