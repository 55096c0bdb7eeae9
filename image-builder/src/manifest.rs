//! `manifest.json`: what a build produced and from what, so the appliance can check the files
//! it serves and a rebuild can be compared with the original.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub artifacts: Vec<Artifact>,
    pub inputs: Inputs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// File name inside the output directory.
    pub name: String,
    pub kind: ArtifactKind,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Kernel,
    Initrd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub kernel_version: String,
    pub agent_sha256: String,
    /// Module names in the order the agent loads them.
    pub modules: Vec<String>,
    /// Requested modules that are built into this kernel.
    pub builtin_modules: Vec<String>,
    pub source_date_epoch: u32,
    pub compression: String,
}

impl Manifest {
    /// Pretty JSON with a final newline; field order is fixed, so equal manifests are equal
    /// bytes.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self).map(|s| s + "\n")
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the byte count and the hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.len, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Size and hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashing_writer_matches_file_hash() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (inner, len, sha) = w.finish();
        assert_eq!((inner.as_slice(), len), (b"abc".as_slice(), 3));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            sha256_file(tmp.path()).unwrap(),
            (0, EMPTY_SHA256.to_owned())
        );
    }

    #[test]
    fn manifest_json_has_the_agreed_fields() {
        let m = Manifest {
            artifacts: vec![Artifact {
                name: "initrd.img".into(),
                kind: ArtifactKind::Initrd,
                size: 1,
                sha256: EMPTY_SHA256.into(),
            }],
            inputs: Inputs {
                kernel_version: "6.1.0-9-amd64".into(),
                agent_sha256: EMPTY_SHA256.into(),
                modules: vec!["virtio".into()],
                builtin_modules: vec![],
                source_date_epoch: 0,
                compression: "zstd-19".into(),
            },
        };
        let json = m.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["artifacts"][0]["kind"], "initrd");
        assert_eq!(v["inputs"]["kernel_version"], "6.1.0-9-amd64");
        assert!(json.ends_with("}\n"));
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }
}
