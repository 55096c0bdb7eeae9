//! Ethernet MAC addresses, written the way Linux and iPXE print them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a MAC address: {input:?} (expected six hex bytes such as 52:54:00:12:34:56)")]
pub struct ParseMacError {
    pub input: String,
}

impl MacAddr {
    /// The PXELINUX `BOOTIF` form: hardware type 1 then the bytes, dash separated.
    pub fn to_bootif(&self) -> String {
        let b = self.0;
        format!(
            "01-{:02x}-{:02x}-{:02x}-{:02x}-{:02x}-{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }

    /// Parses a `BOOTIF` value (`01-aa-bb-cc-dd-ee-ff`) or a plain MAC.
    pub fn from_bootif(s: &str) -> Result<Self, ParseMacError> {
        let body = s.strip_prefix("01-").unwrap_or(s);
        body.parse()
    }

    /// Takes the first six bytes of a DHCP `chaddr`.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let six: [u8; 6] = bytes.get(..6)?.try_into().ok()?;
        Some(Self(six))
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    /// Accepts `:` or `-` separators in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError {
            input: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// MAC address, colon-separated hex.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for MacAddr {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"))
            .examples(["52:54:00:12:34:56"])
            .description(Some("MAC address, colon-separated hex."))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for MacAddr {}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_and_prints_lowercase_colons() {
        let a: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        let b: MacAddr = "52-54-00-ab-cd-01".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn bootif_round_trips() {
        let a: MacAddr = "52:54:00:ab:cd:01".parse().unwrap();
        assert_eq!(a.to_bootif(), "01-52-54-00-ab-cd-01");
        assert_eq!(MacAddr::from_bootif(&a.to_bootif()).unwrap(), a);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "52:54:00",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let a: MacAddr = "52:54:00:ab:cd:01".parse().unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"52:54:00:ab:cd:01\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), a);
    }
}
