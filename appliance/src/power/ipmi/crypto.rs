//! RMCP+ cryptography for cipher suites 3 and 17 (IPMI v2.0 sections 13.28-13.32 and
//! errata 7 for SHA-256): the RAKP key-exchange HMACs, the session integrity key (SIK) and
//! the keys K1 (integrity) and K2 (AES key), packet integrity, and AES-CBC-128 with the
//! IPMI confidentiality pad.
//!
//! Keys live in [`SessionKeys`], whose `Debug` hides them and which is zeroed on drop.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::wire::Algorithms;

/// Authentication algorithm numbers (table 13-17).
const AUTH_RAKP_HMAC_SHA1: u8 = 0x01;
const AUTH_RAKP_HMAC_SHA256: u8 = 0x03;
/// Integrity algorithm numbers (table 13-18).
const INTEGRITY_HMAC_SHA1_96: u8 = 0x01;
const INTEGRITY_HMAC_SHA256_128: u8 = 0x04;
/// Confidentiality algorithm numbers (table 13-19).
const CONFIDENTIALITY_AES_CBC_128: u8 = 0x01;

/// Passwords (Kuid) are at most 20 bytes in IPMI 2.0 (section 13.31).
pub const MAX_PASSWORD_LEN: usize = 20;
/// User names are at most 16 bytes (RAKP 1).
pub const MAX_USERNAME_LEN: usize = 16;

/// The two cipher suites Stork speaks (table 22-20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherSuite {
    /// RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128.
    Suite3,
    /// RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128.
    Suite17,
}

impl CipherSuite {
    pub fn id(self) -> u8 {
        match self {
            CipherSuite::Suite3 => 3,
            CipherSuite::Suite17 => 17,
        }
    }

    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            3 => Some(CipherSuite::Suite3),
            17 => Some(CipherSuite::Suite17),
            _ => None,
        }
    }

    pub fn algorithms(self) -> Algorithms {
        match self {
            CipherSuite::Suite3 => Algorithms {
                auth: AUTH_RAKP_HMAC_SHA1,
                integrity: INTEGRITY_HMAC_SHA1_96,
                confidentiality: CONFIDENTIALITY_AES_CBC_128,
            },
            CipherSuite::Suite17 => Algorithms {
                auth: AUTH_RAKP_HMAC_SHA256,
                integrity: INTEGRITY_HMAC_SHA256_128,
                confidentiality: CONFIDENTIALITY_AES_CBC_128,
            },
        }
    }

    /// Length of the RAKP 2/3 key exchange auth codes (a full HMAC).
    pub fn auth_code_len(self) -> usize {
        match self {
            CipherSuite::Suite3 => 20,
            CipherSuite::Suite17 => 32,
        }
    }

    /// Length of the RAKP 4 integrity check value: 12 for SHA1-96, 16 for SHA256-128.
    pub fn rakp4_icv_len(self) -> usize {
        self.integrity_len()
    }

    /// Length of a packet's integrity AuthCode.
    pub fn integrity_len(self) -> usize {
        match self {
            CipherSuite::Suite3 => 12,
            CipherSuite::Suite17 => 16,
        }
    }

    /// HMAC with the suite's hash; the full output.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            CipherSuite::Suite3 => hmac_parts::<Hmac<Sha1>>(key, parts),
            CipherSuite::Suite17 => hmac_parts::<Hmac<Sha256>>(key, parts),
        }
    }
}

fn hmac_parts<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length (long keys are hashed), so this cannot fail.
    let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Everything both RAKP HMACs and the SIK are computed over; one place so the client and
/// the test BMC cannot disagree on field order.
#[derive(Debug, Clone)]
pub struct RakpTranscript<'a> {
    pub console_session_id: u32,
    pub managed_session_id: u32,
    pub console_random: [u8; 16],
    pub managed_random: [u8; 16],
    pub managed_guid: [u8; 16],
    /// The role byte exactly as RAKP 1 carried it.
    pub role: u8,
    pub username: &'a [u8],
}

impl RakpTranscript<'_> {
    /// RAKP 2 key exchange auth code (section 13.31):
    /// HMAC_Kuid(SIDm, SIDc, Rm, Rc, GUIDc, ROLEm, ULENGTHm, UNAMEm).
    pub fn rakp2_auth_code(&self, suite: CipherSuite, kuid: &[u8]) -> Vec<u8> {
        suite.hmac(
            kuid,
            &[
                &self.console_session_id.to_le_bytes(),
                &self.managed_session_id.to_le_bytes(),
                &self.console_random,
                &self.managed_random,
                &self.managed_guid,
                &[self.role, self.username.len() as u8],
                self.username,
            ],
        )
    }

    /// RAKP 3 key exchange auth code (section 13.31):
    /// HMAC_Kuid(Rc, SIDm, ROLEm, ULENGTHm, UNAMEm).
    pub fn rakp3_auth_code(&self, suite: CipherSuite, kuid: &[u8]) -> Vec<u8> {
        suite.hmac(
            kuid,
            &[
                &self.managed_random,
                &self.console_session_id.to_le_bytes(),
                &[self.role, self.username.len() as u8],
                self.username,
            ],
        )
    }

    /// The session keys (section 13.32): SIK = HMAC_Kg(Rm, Rc, ROLEm, ULENGTHm, UNAMEm),
    /// K1 = HMAC_SIK(0x01 x 20), K2 = HMAC_SIK(0x02 x 20). Without a BMC key, Kg = Kuid.
    pub fn session_keys(&self, suite: CipherSuite, kg: &[u8]) -> SessionKeys {
        let sik = suite.hmac(
            kg,
            &[
                &self.console_random,
                &self.managed_random,
                &[self.role, self.username.len() as u8],
                self.username,
            ],
        );
        // The constants are 20 bytes for SHA-256 too (errata 7; ipmitool and OpenBMC agree).
        let k1 = suite.hmac(&sik, &[&[0x01; 20]]);
        let k2 = suite.hmac(&sik, &[&[0x02; 20]]);
        SessionKeys { suite, sik, k1, k2 }
    }
}

/// Pads a password to the 20-byte Kuid. HMAC pads short keys with zeros anyway, so this
/// only matters for clarity and for the length check.
pub fn kuid(password: &[u8]) -> Option<[u8; MAX_PASSWORD_LEN]> {
    if password.len() > MAX_PASSWORD_LEN {
        return None;
    }
    let mut k = [0u8; MAX_PASSWORD_LEN];
    k[..password.len()].copy_from_slice(password);
    Some(k)
}

/// A session's keys. Never logged; zeroed on drop.
pub struct SessionKeys {
    pub suite: CipherSuite,
    sik: Vec<u8>,
    k1: Vec<u8>,
    k2: Vec<u8>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        for k in [&mut self.sik, &mut self.k1, &mut self.k2] {
            for b in k.iter_mut() {
                // SAFETY: a volatile write to a valid, exclusively borrowed byte.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
        }
    }
}

impl SessionKeys {
    /// RAKP 4 integrity check value (section 13.31): HMAC_SIK(Rm, SIDc, GUIDc), truncated
    /// to 12 bytes (SHA1-96) or 16 bytes (SHA256-128).
    pub fn rakp4_icv(
        &self,
        console_random: &[u8; 16],
        managed_session_id: u32,
        guid: &[u8; 16],
    ) -> Vec<u8> {
        let mut v = self.suite.hmac(
            &self.sik,
            &[console_random, &managed_session_id.to_le_bytes(), guid],
        );
        v.truncate(self.suite.rakp4_icv_len());
        v
    }

    /// A packet's integrity AuthCode: HMAC_K1 over the session header through the
    /// "next header" byte, truncated.
    pub fn integrity(&self, covered: &[u8]) -> Vec<u8> {
        let mut v = self.suite.hmac(&self.k1, &[covered]);
        v.truncate(self.suite.integrity_len());
        v
    }

    /// Checks an AuthCode in constant time.
    pub fn verify_integrity(&self, covered: &[u8], code: &[u8]) -> bool {
        let want = self.integrity(covered);
        want.len() == code.len() && want.iter().zip(code).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }

    fn aes_key(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k.copy_from_slice(&self.k2[..16]);
        k
    }

    /// AES-CBC-128 encryption (section 13.29): IV, then the payload with the
    /// confidentiality pad 0x01, 0x02, .. n and the pad length n, encrypted with K2[0..16].
    pub fn encrypt(&self, iv: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let pad = (16 - (payload.len() + 1) % 16) % 16;
        let mut buf = Vec::with_capacity(16 + payload.len() + pad + 1);
        buf.extend_from_slice(payload);
        buf.extend((1..=pad as u8).collect::<Vec<_>>());
        buf.push(pad as u8);
        let len = buf.len();
        let enc = cbc::Encryptor::<aes::Aes128>::new(&self.aes_key().into(), &iv.into());
        // The buffer is a whole number of blocks by construction.
        let ct = enc
            .encrypt_padded_mut::<NoPadding>(&mut buf, len)
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts an AES-CBC-128 payload and strips the confidentiality pad.
    pub fn decrypt(&self, data: &[u8]) -> Result<Vec<u8>, DecryptError> {
        if data.len() < 32 || !data.len().is_multiple_of(16) {
            return Err(DecryptError::Length(data.len()));
        }
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&data[..16]);
        let mut buf = data[16..].to_vec();
        let dec = cbc::Decryptor::<aes::Aes128>::new(&self.aes_key().into(), &iv.into());
        let pt = dec
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| DecryptError::Length(data.len()))?;
        let Some((&pad, rest)) = pt.split_last() else {
            return Err(DecryptError::Length(data.len()));
        };
        let pad = pad as usize;
        if pad > 15 || pad > rest.len() {
            return Err(DecryptError::Pad);
        }
        let (payload, pad_bytes) = rest.split_at(rest.len() - pad);
        // The pad is 1, 2, 3, ..; a wrong key shows up here.
        if pad_bytes
            .iter()
            .enumerate()
            .any(|(i, b)| *b as usize != i + 1)
        {
            return Err(DecryptError::Pad);
        }
        Ok(payload.to_vec())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("encrypted payload of {0} bytes is not IV plus whole AES blocks")]
    Length(usize),
    #[error("confidentiality pad is wrong (wrong key?)")]
    Pad,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn hmac_matches_rfc_vectors() {
        // RFC 2202 test case 2 (SHA-1) and RFC 4231 test case 2 (SHA-256).
        assert_eq!(
            CipherSuite::Suite3.hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
        );
        assert_eq!(
            CipherSuite::Suite17.hmac(b"Jefe", &[b"what do ya want for nothing?"]),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }

    #[test]
    fn kuid_pads_and_limits() {
        let k = kuid(b"abc").unwrap();
        assert_eq!(&k[..3], b"abc");
        assert!(k[3..].iter().all(|b| *b == 0));
        assert!(kuid(&[b'x'; 21]).is_none());
        // Zero-padding the key does not change an HMAC: padded and bare agree.
        assert_eq!(
            CipherSuite::Suite17.hmac(&k, &[b"m"]),
            CipherSuite::Suite17.hmac(b"abc", &[b"m"])
        );
    }

    #[test]
    fn aes_round_trip_and_pad() {
        let t = RakpTranscript {
            console_session_id: 1,
            managed_session_id: 2,
            console_random: [3; 16],
            managed_random: [4; 16],
            managed_guid: [5; 16],
            role: 0x14,
            username: b"u",
        };
        for suite in [CipherSuite::Suite3, CipherSuite::Suite17] {
            let keys = t.session_keys(suite, b"pw");
            for n in 0..40 {
                let payload: Vec<u8> = (0..n as u8).collect();
                let ct = keys.encrypt([9; 16], &payload);
                assert_eq!(ct.len() % 16, 0);
                assert_eq!(keys.decrypt(&ct).unwrap(), payload, "n={n}");
            }
            let other = t.session_keys(suite, b"other");
            let ct = keys.encrypt([9; 16], b"hello");
            assert!(other.decrypt(&ct).is_err());
            assert_eq!(
                format!("{keys:?}"),
                format!("SessionKeys {{ suite: {suite:?}, .. }}")
            );
        }
    }
}
