//! The root tar streamed into `tar -x`: downloaded on its own thread ([`Prefetched`]),
//! decompressed here ([`pump`]) and piped into tar. The sum is checked once the last byte is
//! in, and a mismatch is blamed ahead of the decoder and tar.

use std::cell::Cell;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Instant;

use anyhow::Result;
use stork_proto::{AgentEvent, ImageFile, StepState};

use super::decompress::{Pumped, pump};
use super::error::ExtractError;
use super::tool::{TOOL_TAIL_LINES, output_tail};
use crate::appliance::ApplianceClient;
use crate::console::{human_bytes, say};
use crate::deploy::download::{CHUNK, Download, StreamError};
use crate::deploy::prefetch::Prefetched;
use crate::step::Step;

/// Counts the compressed bytes the decoder has taken, for progress.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// What [`extract`] did.
#[derive(Debug)]
struct Extracted {
    received: u64,
    tar_bytes: u64,
    resumes: u32,
    sha256: String,
    secs: f64,
}

pub(super) fn extract(client: &ApplianceClient, tar: &ImageFile, target: &Path) -> Result<()> {
    client.step_event(
        Step::Image,
        StepState::Started,
        format!(
            "extracting {} ({}) into {}",
            tar.url,
            human_bytes(tar.size),
            target.display()
        ),
    );
    let x = stream_into_tar(client, tar, target)?;
    client.step_event(
        Step::Image,
        StepState::Done,
        format!(
            "{} of tar extracted from {} in {:.1} s ({:.0} MB/s), {} resumes, sha256 {} ok",
            human_bytes(x.tar_bytes),
            human_bytes(x.received),
            x.secs,
            x.received as f64 / x.secs.max(0.001) / 1e6,
            x.resumes,
            x.sha256
        ),
    );
    Ok(())
}

fn stream_into_tar(
    client: &ApplianceClient,
    file: &ImageFile,
    target: &Path,
) -> Result<Extracted, ExtractError> {
    let start = Instant::now();
    let download = Download::new(&file.url)?;
    let mut child = Command::new("tar")
        .args([
            "-x",
            "-p",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-f",
            "-",
            "-C",
        ])
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ExtractError::Missing {
                tool: "tar".into(),
                source,
            },
            _ => ExtractError::Spawn {
                tool: "tar".into(),
                source,
            },
        })?;
    // Read tar's messages as they come: a full stderr pipe would stop tar, and then us.
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            // Best effort: what tar managed to say is still worth showing.
            let _ = e.read_to_end(&mut text);
            text
        })
    });
    let mut prefetched = Prefetched::start(download);
    let consumed = Rc::new(Cell::new(0u64));
    let mut tar_bytes = 0u64;
    let pumped = {
        let input = BufReader::with_capacity(
            CHUNK,
            Counted {
                inner: &mut prefetched,
                count: Rc::clone(&consumed),
            },
        );
        match child.stdin.take() {
            Some(stdin) => pump(input, stdin, &mut tar_bytes, &mut |bytes| {
                report(client, consumed.get(), file.size, bytes);
            }),
            None => Pumped::Write(io::ErrorKind::BrokenPipe.into()),
        }
    };
    // stdin is closed: tar sees the end of its input.
    let status = child.wait().map_err(|source| ExtractError::Spawn {
        tool: "tar".into(),
        source,
    })?;
    let said = stderr
        .and_then(|t| t.join().ok())
        .map(|e| output_tail(&[], &e, TOOL_TAIL_LINES))
        .unwrap_or_default();

    // Blame in order: the download, a file that is not the registered one, then the decoder
    // and tar (a corrupt file makes both fail, and the sum says why).
    let pumped = match pumped {
        Pumped::Read(e) => Pumped::Read(take_stream_error(e)?),
        other => other,
    };
    // The rest of the file, whatever tar and the decoder took: the sum covers every byte.
    let download = match prefetched.finish() {
        Ok(d) => d,
        Err(e) => {
            return Err(match take_stream_error(e) {
                Ok(source) => ExtractError::Rest(source),
                Err(se) => se,
            });
        }
    };
    let actual = download.sha256_hex();
    if !actual.eq_ignore_ascii_case(file.sha256.trim()) {
        return Err(StreamError::Checksum {
            expected: file.sha256.trim().to_string(),
            actual,
            bytes: download.received(),
        }
        .into());
    }
    if file.size > 0 && download.received() != file.size {
        return Err(StreamError::Size {
            expected: file.size,
            actual: download.received(),
        }
        .into());
    }
    match pumped {
        Pumped::Read(source) => {
            return Err(ExtractError::Decode {
                offset: tar_bytes,
                source,
            });
        }
        // tar stopped reading: at its end-of-archive blocks (then it succeeded) or on an error.
        Pumped::Write(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Pumped::Write(source) => {
            return Err(ExtractError::Pipe {
                offset: tar_bytes,
                source,
            });
        }
        Pumped::Done => {}
    }
    if !status.success() {
        return Err(ExtractError::Tool {
            command: format!("tar -x -C {}", target.display()),
            status,
            tail: if said.is_empty() {
                "(no output)".into()
            } else {
                said
            },
        });
    }
    nix::unistd::sync();
    Ok(Extracted {
        received: download.received(),
        tar_bytes,
        resumes: download.resumes,
        sha256: actual,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// A download error travels through the decoder inside an `io::Error`: take it back out
/// (as the error to return), or give the `io::Error` back.
fn take_stream_error(e: io::Error) -> Result<io::Error, ExtractError> {
    if !e.get_ref().is_some_and(|inner| inner.is::<StreamError>()) {
        return Ok(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<StreamError>()) {
        Some(Ok(se)) => Err(ExtractError::Stream(*se)),
        Some(Err(other)) => Ok(io::Error::new(kind, other)),
        None => Ok(kind.into()),
    }
}

fn report(client: &ApplianceClient, received: u64, total: u64, tar_bytes: u64) {
    let message = format!(
        "{} of {} received, {} of tar extracted",
        human_bytes(received),
        human_bytes(total),
        human_bytes(tar_bytes)
    );
    say!(Step::Image, "{message}");
    client.progress(&AgentEvent {
        step: Step::Image,
        state: StepState::Progress,
        message,
        progress: (total > 0).then(|| (received as f32 / total as f32).min(1.0)),
        log_tail: None,
    });
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// The image streaming tests' server: Range honoured, the first `cuts` connections
    /// closed after `cut_at` body bytes.
    fn serve(
        file: Vec<u8>,
        cuts: usize,
        cut_at: usize,
    ) -> (String, std::thread::JoinHandle<Vec<u64>>) {
        crate::deploy::stream::tests::serve(file, cuts, cut_at, false)
    }

    /// A root tree as `tar -c | zstd`, with data zstd cannot shrink to nothing.
    fn root_tar() -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("etc")).unwrap();
        fs::write(src.path().join("etc/hostname"), "image\n").unwrap();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..3 * CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(src.path().join("blob"), &noise).unwrap();
        std::os::unix::fs::symlink("etc/hostname", src.path().join("link")).unwrap();
        let out = Command::new("tar")
            .args(["-c", "-f", "-", "-C"])
            .arg(src.path())
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success());
        zstd::encode_all(&out.stdout[..], 1).unwrap()
    }

    fn image_file(url: &str, data: &[u8], sha256: Option<&str>) -> ImageFile {
        use sha2::Digest;
        ImageFile {
            role: "tar".into(),
            url: url.into(),
            sha256: sha256.map_or_else(|| hex::encode(sha2::Sha256::digest(data)), String::from),
            size: data.len() as u64,
        }
    }

    /// No identity: progress events go nowhere.
    fn quiet_client() -> ApplianceClient {
        ApplianceClient::new("http://127.0.0.1:9")
    }

    #[test]
    fn the_root_tar_streams_into_tar_and_resumes_after_a_cut() {
        let tar = root_tar();
        let (url, server) = serve(tar.clone(), 1, tar.len() / 3);
        let target = tempfile::tempdir().unwrap();
        let x = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &tar, None),
            target.path(),
        )
        .unwrap();
        assert_eq!(x.received, tar.len() as u64);
        assert_eq!(x.resumes, 1);
        assert!(x.tar_bytes > 3 * CHUNK as u64);
        assert_eq!(
            fs::read_to_string(target.path().join("etc/hostname")).unwrap(),
            "image\n"
        );
        assert_eq!(
            fs::metadata(target.path().join("blob")).unwrap().len(),
            3 * CHUNK as u64
        );
        assert_eq!(
            fs::read_link(target.path().join("link")).unwrap(),
            Path::new("etc/hostname")
        );
        let starts = server.join().unwrap();
        assert_eq!(starts, [0, (tar.len() / 3) as u64]);
    }

    #[test]
    fn a_wrong_sum_fails_with_both_sums_and_a_bad_archive_with_tars_words() {
        let tar = root_tar();
        let wrong = "0".repeat(64);
        let (url, server) = serve(tar.clone(), 0, 0);
        let target = tempfile::tempdir().unwrap();
        let e = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &tar, Some(&wrong)),
            target.path(),
        )
        .unwrap_err();
        let right = image_file(&url, &tar, None).sha256;
        let m = e.to_string();
        assert!(
            m.contains("sha256 mismatch") && m.contains(&wrong) && m.contains(&right),
            "{m}"
        );
        server.join().unwrap();

        // The registered bytes, but not a tar: tar's own complaint is the error.
        let junk = zstd::encode_all(&[b'x'; 10_000][..], 1).unwrap();
        let (url, server) = serve(junk.clone(), 0, 0);
        let e = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &junk, None),
            target.path(),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, ExtractError::Tool { .. }), "{m}");
        assert!(m.contains("tar -x") && m.contains("tar:"), "{m}");
        server.join().unwrap();
    }
}
