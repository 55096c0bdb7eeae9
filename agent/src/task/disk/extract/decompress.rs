//! The root tar's compression, told by its magic number, and its decoding into tar's stdin.

use std::io::{self, BufRead, Read, Write};
use std::time::Instant;

use crate::deploy::download::CHUNK;
use crate::deploy::stream::{Format, sniff};
use crate::task::PROGRESS_EVERY;

/// How feeding tar ended.
pub(super) enum Pumped {
    /// The decoder reached its end.
    Done,
    /// Reading failed: the download (a [`StreamError`](crate::deploy::download::StreamError)
    /// inside) or the decoder.
    Read(io::Error),
    /// Writing to tar failed; a broken pipe means tar exited (its status says why).
    Write(io::Error),
}

/// Decompresses `input` (by its magic number) into tar's stdin, calling `progress` every
/// [`PROGRESS_EVERY`] with the tar bytes written.
pub(super) fn pump(
    mut input: impl BufRead,
    mut stdin: impl Write,
    written: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Pumped {
    let head = match input.fill_buf() {
        Ok(h) => h,
        Err(e) => return Pumped::Read(e),
    };
    let mut decoder: Box<dyn Read + '_> = match sniff(head) {
        Format::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => return Pumped::Read(e),
        },
        Format::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Format::Raw => Box::new(input),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Pumped::Done,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Pumped::Read(e),
        };
        if let Err(e) = stdin.write_all(&buf[..n]) {
            return Pumped::Write(e);
        }
        *written += n as u64;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            progress(*written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_tells_the_compression_by_its_magic() {
        assert_eq!(sniff(&[0x28, 0xB5, 0x2F, 0xFD, 0]), Format::Zstd);
        assert_eq!(sniff(b"./etc\0"), Format::Raw);
    }

    /// A tar writer that stops reading early, as tar does at its end-of-archive blocks.
    struct ShortPipe(usize);
    impl Write for ShortPipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pump_decompresses_by_magic_and_tells_a_broken_pipe() {
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        let zst = zstd::encode_all(&data[..], 3).unwrap();
        let mut out = Vec::new();
        let mut n = 0;
        let r = pump(&zst[..], &mut out, &mut n, &mut |_| {});
        assert!(matches!(r, Pumped::Done));
        assert_eq!(out, data);
        assert_eq!(n, data.len() as u64);

        let mut n = 0;
        let r = pump(&data[..], ShortPipe(CHUNK), &mut n, &mut |_| {});
        assert!(matches!(r, Pumped::Write(e) if e.kind() == io::ErrorKind::BrokenPipe));
        assert_eq!(n, CHUNK as u64);

        let mut bad = zst.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xFF;
        bad.truncate(mid + 10);
        let r = pump(&bad[..], io::sink(), &mut 0, &mut |_| {});
        assert!(matches!(r, Pumped::Read(_)));
    }
}
