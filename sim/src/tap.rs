//! The one tap every simulated host sends and receives through: a Linux TAP device opened
//! non-blocking, read and written a whole Ethernet frame at a time.
//!
//! With segmentation offload, as a virtio NIC has: each frame carries a `virtio_net_hdr`,
//! and the kernel hands over TCP segments of up to 64 KiB unsegmented, with their checksum
//! left partial (the tap is a wire that corrupts nothing). One read and one dispatch per
//! 64 KiB instead of per 1.5 KiB: per-frame work is what bounds a one-thread simulator.
//!
//! Written here rather than taken from smoltcp's `TunTapInterface`: that one panics on any
//! read error but `WouldBlock`, and the fleet's own dispatcher needs the raw frames (it
//! routes them by MAC to a thousand interfaces), not one smoltcp device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// `TUNSETIFF` from `<linux/if_tun.h>`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`, and the offloads it enables.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
/// `struct virtio_net_hdr` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset): the tap's default header, before every frame both ways.
pub const VNET_HDR: usize = 10;
/// The largest frame read: a 64 KiB IPv4 packet, its Ethernet header and the vnet header.
pub const MAX_FRAME: usize = VNET_HDR + 14 + 65535;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest of the union is
/// padding).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    fd: AsyncFd<OwnedFd>,
}

impl Tap {
    /// Attaches to the TAP device `name` (created if missing; the caller puts it on the
    /// bridge and sets it up). Must be called inside a tokio runtime.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tap name {name:?}: 1 to 15 bytes"),
            ));
        }
        // SAFETY: a NUL-terminated path; the returned descriptor is checked and owned below.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which `IfReq` lays out, from a live
        // local; the descriptor is open.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let offload = TUN_F_CSUM | TUN_F_TSO4;
        // SAFETY: TUNSETOFFLOAD takes its flags by value; the descriptor is open.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, offload) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same
        // descriptor for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    /// One frame read into `buf` (at least [`MAX_FRAME`] long), without its vnet header,
    /// or `None` when none is waiting.
    pub fn try_recv<'a>(&self, buf: &'a mut [u8]) -> io::Result<Option<&'a [u8]>> {
        // SAFETY: `buf` is writable for its length; the descriptor is open.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(buf.get(VNET_HDR..n as usize).unwrap_or_default()))
    }

    /// Sends one frame (whole, checksums done: an all-zero vnet header). A full queue
    /// drops it (`false`), as a NIC's full ring would: TCP and the clients' retries recover.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        let header = [0u8; VNET_HDR];
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both buffers are readable for their lengths and outlive the call (writev
        // only reads them); the descriptor is open.
        let n = unsafe { libc::writev(self.raw(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    /// Waits until a frame may be waiting.
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        guard.clear_ready();
        Ok(())
    }
}
