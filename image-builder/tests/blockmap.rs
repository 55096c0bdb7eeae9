//! The raw image with its block map, from a small sparse disk image: the map lists exactly the
//! blocks with data (holes and written zero blocks are gaps), the file is a whole-image zstd
//! stream that the real `zstd -d` decodes to the image, each frame the map names decodes on
//! its own to its range's bytes, each gap's bytes are zero frames, and the copy with a range
//! dropped is registered with the new map's sum.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use stork_image::blockmap::{self, BLOCK, FRAME};
use stork_image::manifest::{
    ArtifactKind, ImageArtifact, ImageEntry, ImageInputs, ImageKind, ImageManifest,
};
use stork_proto::blockmap::{self as blockmap_format, BlockMap, SegmentKind, ZeroFrames};

const MIB: u64 = 1 << 20;

/// Data that does not compress to nothing.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 64 MiB, sparse: a boot sector, 1 MiB at 10 MiB, a written block of zeros at 20 MiB (data
/// to SEEK_DATA, a gap to the map), 9 MiB from 30 MiB (three frames), a tail in the last MiB.
fn sparse_image(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = File::create(path)?;
    f.set_len(64 * MIB)?;
    let mut whole = vec![0u8; 64 * MIB as usize];
    let mut put = |at: u64, data: &[u8]| {
        whole[at as usize..at as usize + data.len()].copy_from_slice(data);
        f.write_all_at(data, at)
    };
    put(0, &noise(512, 1))?;
    put(10 * MIB + 4096, &noise(MIB as usize - 4096, 2))?;
    put(20 * MIB, &vec![0u8; MIB as usize])?;
    put(30 * MIB, &noise(9 * MIB as usize, 3))?;
    put(64 * MIB - 4096, &noise(4096, 4))?;
    Ok(whole)
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[test]
fn the_map_lists_the_data_and_the_file_is_the_whole_image() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("img.raw");
    let image = sparse_image(&raw).unwrap();
    let extents = blockmap::data_extents(&File::open(&raw).unwrap(), 64 * MIB).unwrap();
    // tmpfs and ext4 keep holes; the written zeros at 20 MiB are data to them.
    assert!(extents.contains(&(20 * MIB, 21 * MIB)), "{extents:?}");
    assert!(!extents.iter().any(|(s, e)| *s < 40 * MIB && *e > 40 * MIB));

    let (out, map_out) = (tmp.path().join("img.raw.zst"), tmp.path().join("map.json"));
    let m = blockmap::compress_mapped(&raw, &out, &map_out, 3, &[]).unwrap();
    let ranges: Vec<_> = m.map.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(
        ranges,
        [
            (0, MIB),
            (10 * MIB, MIB),
            (30 * MIB, 9 * MIB),
            (63 * MIB, MIB)
        ]
    );
    let frames: Vec<_> = m.map.ranges[2].frames.iter().map(|f| f.length).collect();
    assert_eq!(frames, [FRAME, FRAME, MIB]);
    assert_eq!((m.map.image_size, m.map.block_size), (64 * MIB, BLOCK));

    // The files are what the manifest will say, and the map on disk is the one returned.
    let bytes = fs::read(&out).unwrap();
    assert_eq!(
        (m.file_size, m.file_sha256.as_str()),
        (bytes.len() as u64, sha(&bytes).as_str())
    );
    let map_bytes = fs::read(&map_out).unwrap();
    assert_eq!(m.map_sha256, sha(&map_bytes));
    let on_disk: BlockMap = serde_json::from_slice(&map_bytes).unwrap();
    assert_eq!(on_disk, m.map);

    // Any zstd decoder reads the whole image from it: the real tool, and the crate.
    let decoded = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(decoded.status.success(), "{decoded:?}");
    assert!(
        decoded.stdout == image,
        "zstd -d differs from the raw image"
    );
    assert_eq!(
        blockmap::zstd_content_size(&out).unwrap(),
        Some(64 * MIB),
        "the frames' sizes add up to the image"
    );

    // Frame by frame as the agent reads it: each data frame alone is its range's bytes, each
    // gap is zero frames only.
    let segments = m.map.segments(m.file_size, &m.file_sha256).unwrap();
    let mut at = 0;
    for s in &segments {
        assert_eq!(s.image_offset, at);
        at += s.length;
        let file = &bytes[s.file_offset as usize..(s.file_offset + s.file_length) as usize];
        match s.kind {
            SegmentKind::Data { .. } => {
                let d = zstd::bulk::decompress(file, s.length as usize).unwrap();
                assert!(
                    d[..] == image[s.image_offset as usize..(s.image_offset + s.length) as usize]
                );
            }
            SegmentKind::Gap => {
                let mut z = ZeroFrames::new(s.length, s.image_offset, s.file_offset);
                z.feed(file).unwrap();
                z.finish().unwrap();
            }
        }
    }
    assert_eq!(at, 64 * MIB);
    // Gaps cost next to nothing: 54 MiB of zeros in a few hundred bytes.
    let gap_bytes: u64 = segments
        .iter()
        .filter(|s| s.kind == SegmentKind::Gap)
        .map(|s| s.file_length)
        .sum();
    assert!(gap_bytes < 4 * 14 + 54 * 32, "{gap_bytes}");
}

#[test]
fn kept_areas_are_data_in_the_map_even_where_they_are_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("img.raw");
    let image = sparse_image(&raw).unwrap();
    let (out, map_out) = (tmp.path().join("img.raw.zst"), tmp.path().join("map.json"));
    // Written zeros at 20 MiB, and 10 bytes of a hole inside 40 MiB (widened to its block).
    let keep = [(20 * MIB, MIB), (40 * MIB + 100, 10)];
    let m = blockmap::compress_mapped(&raw, &out, &map_out, 3, &keep).unwrap();
    assert_eq!(m.map.version, blockmap_format::VERSION);
    assert!(!m.map.zeroes_gaps());
    let ranges: Vec<_> = m.map.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(
        ranges,
        [
            (0, MIB),
            (10 * MIB, MIB),
            (20 * MIB, MIB),
            (30 * MIB, 9 * MIB),
            (40 * MIB, MIB),
            (63 * MIB, MIB)
        ]
    );
    let decoded = zstd::decode_all(&fs::read(&out).unwrap()[..]).unwrap();
    assert!(decoded == image, "the file decodes to the image");
}

#[test]
fn a_copy_with_a_range_dropped_is_registered_with_its_new_sum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("images");
    fs::create_dir(&dir).unwrap();
    let raw = tmp.path().join("img.raw");
    sparse_image(&raw).unwrap();
    let m = blockmap::compress_mapped(
        &raw,
        &dir.join("deb.raw.zst"),
        &dir.join("deb.raw.map.json"),
        3,
        &[],
    )
    .unwrap();
    let artifact = |name: &str, kind, size, sha256: &str| ImageArtifact {
        name: name.into(),
        kind,
        size,
        sha256: sha256.into(),
        compression: "zstd".into(),
        uncompressed_size: None,
    };
    let mut manifest = ImageManifest::default();
    manifest.put(ImageEntry {
        name: "deb".into(),
        kind: ImageKind::Os,
        arch: "amd64".into(),
        artifacts: vec![
            artifact(
                "deb.raw.zst",
                ArtifactKind::RawDiskZst,
                m.file_size,
                &m.file_sha256,
            ),
            artifact(
                "deb.raw.map.json",
                ArtifactKind::RawDiskMap,
                m.map_size,
                &m.map_sha256,
            ),
        ],
        inputs: ImageInputs {
            builder: String::new(),
            recipe_sha256: String::new(),
            suite: String::new(),
            variant: String::new(),
            packages: Vec::new(),
            mirror_sha256: String::new(),
            installed_sha256: String::new(),
            installed_count: 0,
            source_date_epoch: 0,
            settings: Default::default(),
        },
        deploy: None,
    });
    fs::write(dir.join(ImageManifest::FILE), manifest.to_json()).unwrap();

    let out = tmp.path().join("wrong");
    let wrong = blockmap::copy_with_range_dropped(&dir, "deb", 2, &out).unwrap();
    assert_eq!(wrong.ranges.len(), 3);
    let copy = ImageManifest::load(&out).unwrap();
    let entry = copy.get("deb").unwrap();
    let map_bytes = fs::read(out.join("deb.raw.map.json")).unwrap();
    assert_eq!(entry.artifacts[1].sha256, sha(&map_bytes));
    assert_eq!(entry.artifacts[1].size, map_bytes.len() as u64);
    // The original is untouched (the copy's map is a new file, not written through a link).
    assert_eq!(
        sha(&fs::read(dir.join("deb.raw.map.json")).unwrap()),
        m.map_sha256
    );
    // The dropped range is a valid map's gap: only the file's bytes there tell it.
    let segments = wrong.segments(m.file_size, &m.file_sha256).unwrap();
    let bytes = fs::read(out.join("deb.raw.zst")).unwrap();
    let gap = segments
        .iter()
        .find(|s| s.kind == SegmentKind::Gap && s.image_offset == 11 * MIB)
        .unwrap();
    let mut z = ZeroFrames::new(gap.length, gap.image_offset, gap.file_offset);
    let e = z
        .feed(&bytes[gap.file_offset as usize..(gap.file_offset + gap.file_length) as usize])
        .unwrap_err();
    assert_eq!(e.data_at(), Some(30 * MIB));
    assert!(
        blockmap::copy_with_range_dropped(&dir, "deb", 9, &tmp.path().join("x"))
            .unwrap_err()
            .to_string()
            .contains("no range 9")
    );
}
