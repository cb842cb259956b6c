//! Content digests, layer diff IDs and chain IDs.
//!
//! A [`Digest`] is validated once, when it is parsed; after that it is always
//! `algorithm:lowercase-hex` of the right length. [`DiffId`] and [`ChainId`]
//! are distinct types so that a chain ID can never be passed where a blob
//! digest is meant (they are both SHA-256 values and easy to confuse).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The digest algorithms the OCI image spec registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding of one digest value.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected ALGORITHM:HEX, e.g. sha256:<64 hex digits>")]
    MissingSeparator(String),
    #[error(
        "invalid digest {input:?}: unsupported algorithm {algorithm:?} (supported: sha256, sha512)"
    )]
    UnsupportedAlgorithm { input: String, algorithm: String },
    #[error(
        "invalid digest {input:?}: {algorithm} needs {expected} lowercase hex digits, found {found} characters"
    )]
    BadLength {
        input: String,
        algorithm: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("invalid digest {0:?}: the encoded part must be lowercase hex [0-9a-f]")]
    BadHex(String),
}

/// A validated content digest such as `sha256:e3b0c442…`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// Wraps a raw SHA-256 value, e.g. the output of a streaming hasher.
    pub fn from_sha256(raw: [u8; 32]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(raw),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part, without the algorithm prefix: the file name under
    /// `blobs/<algorithm>/`.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Whether `bytes` hash to this digest.
    pub fn verifies(&self, bytes: &[u8]) -> bool {
        match self.algorithm {
            Algorithm::Sha256 => hex::encode(Sha256::digest(bytes)) == self.hex,
            Algorithm::Sha512 => hex::encode(sha2::Sha512::digest(bytes)) == self.hex,
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingSeparator(s.to_owned()))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(DigestError::UnsupportedAlgorithm {
                    input: s.to_owned(),
                    algorithm: other.to_owned(),
                });
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError::BadLength {
                input: s.to_owned(),
                algorithm: algorithm.as_str(),
                expected: algorithm.hex_len(),
                found: hex.len(),
            });
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHex(s.to_owned()));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Digest);

        impl $name {
            pub fn new(digest: Digest) -> Self {
                Self(digest)
            }
            pub fn digest(&self) -> &Digest {
                &self.0
            }
            pub fn hex(&self) -> &str {
                self.0.hex()
            }
        }

        impl FromStr for $name {
            type Err = DigestError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

digest_newtype!(
    /// The digest of a layer's *uncompressed* tar stream (`rootfs.diff_ids`).
    DiffId
);
digest_newtype!(
    /// The identity of a stack of layers, as the OCI image spec defines it:
    /// `ChainID(L0) = DiffID(L0)`, `ChainID(L0..Ln) = SHA256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`.
    /// containerd names committed snapshots by it.
    ChainId
);

impl ChainId {
    /// The chain ID of `diff_id` stacked on `parent` (or of a base layer).
    pub fn next(parent: Option<&ChainId>, diff_id: &DiffId) -> ChainId {
        match parent {
            None => ChainId(diff_id.0.clone()),
            Some(parent) => {
                let mut h = Sha256::new();
                h.update(parent.to_string().as_bytes());
                h.update(b" ");
                h.update(diff_id.to_string().as_bytes());
                ChainId(Digest::from_sha256(h.finalize().into()))
            }
        }
    }

    /// The chain IDs of every prefix of `diff_ids`, bottom layer first.
    pub fn chain(diff_ids: &[DiffId]) -> Vec<ChainId> {
        let mut out: Vec<ChainId> = Vec::with_capacity(diff_ids.len());
        for d in diff_ids {
            let next = ChainId::next(out.last(), d);
            out.push(next);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sha256_of_empty_input_is_the_well_known_value() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY);
        assert!(EMPTY.parse::<Digest>().unwrap().verifies(b""));
        assert!(!EMPTY.parse::<Digest>().unwrap().verifies(b"x"));
    }

    #[test]
    fn digest_parse_rejects_malformed_values_with_reasons() {
        let cases = [
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "ALGORITHM:HEX",
            ),
            (
                "md5:d41d8cd98f00b204e9800998ecf8427e",
                "unsupported algorithm",
            ),
            ("sha256:abc", "64 lowercase hex digits, found 3"),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                "lowercase hex",
            ),
            (
                "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "lowercase hex",
            ),
            ("sha512:00", "128 lowercase hex digits"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<Digest>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn digest_round_trips_through_json_as_a_string() {
        let d: Digest = EMPTY.parse().unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:nothex\"").is_err());
    }

    // The diff IDs of the example configuration in the OCI image spec
    // (config.md, "rootfs"). The expected chain ID was computed independently
    // with coreutils:
    //   printf '%s %s' sha256:c6f9…bbd1 sha256:5f70…c6ef | sha256sum
    const SPEC_DIFF_0: &str =
        "sha256:c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1";
    const SPEC_DIFF_1: &str =
        "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
    const SPEC_CHAIN_1: &str =
        "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f";

    #[test]
    fn chain_id_of_a_base_layer_is_its_diff_id() {
        let d: DiffId = SPEC_DIFF_0.parse().unwrap();
        assert_eq!(ChainId::next(None, &d).to_string(), SPEC_DIFF_0);
    }

    #[test]
    fn chain_id_matches_the_spec_definition_for_the_spec_example() {
        let diffs: Vec<DiffId> = [SPEC_DIFF_0, SPEC_DIFF_1]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let chain = ChainId::chain(&diffs);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].to_string(), SPEC_DIFF_0);
        assert_eq!(chain[1].to_string(), SPEC_CHAIN_1);
    }

    #[test]
    fn chain_of_three_layers_folds_left() {
        let diffs: Vec<DiffId> = [SPEC_DIFF_0, SPEC_DIFF_1, EMPTY]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let chain = ChainId::chain(&diffs);
        let expected = Digest::sha256_of(format!("{SPEC_CHAIN_1} {EMPTY}").as_bytes());
        assert_eq!(chain[2].digest(), &expected);
    }
}
