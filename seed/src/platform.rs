//! Platforms (`os/arch[/variant]`), normalised and matched the way containerd's
//! `platforms` package does it, so that the builder picks from an index exactly
//! the manifest a node's containerd would pick.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error("invalid platform {0:?}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8")]
    Format(String),
    #[error("invalid platform {input:?}: unknown operating system or architecture {part:?}")]
    Unknown { input: String, part: String },
}

/// A normalised platform. Construct it with [`Platform::new`] or by parsing,
/// both of which normalise (`aarch64` -> `arm64`, `x86_64` -> `amd64`, …).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "windows",
    "zos",
    "wasip1",
];

const KNOWN_ARCH: &[&str] = &[
    "386",
    "amd64",
    "amd64p32",
    "arm",
    "armbe",
    "arm64",
    "arm64be",
    "ppc64",
    "ppc64le",
    "loong64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64p32",
    "mips64p32le",
    "ppc",
    "riscv",
    "riscv64",
    "s390",
    "s390x",
    "sparc",
    "sparc64",
    "wasm",
];

fn normalize_os(os: &str) -> String {
    let os = os.to_ascii_lowercase();
    if os == "macos" {
        "darwin".to_owned()
    } else {
        os
    }
}

/// Returns the normalised (architecture, variant) pair, as containerd's
/// `normalizeArch` does.
fn normalize_arch(arch: &str, variant: &str) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.to_ascii_lowercase();
    let (a, v): (&str, String) = match arch.as_str() {
        "i386" => ("386", String::new()),
        "x86_64" | "x86-64" | "amd64" => (
            "amd64",
            if variant == "v1" {
                String::new()
            } else {
                variant
            },
        ),
        "aarch64" | "arm64" => (
            "arm64",
            match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".to_owned(),
                _ => variant,
            },
        ),
        "armhf" => ("arm", "v7".to_owned()),
        "armel" => ("arm", "v6".to_owned()),
        "arm" => (
            "arm",
            match variant.as_str() {
                "" | "7" => "v7".to_owned(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            },
        ),
        other => (other, variant),
    };
    (a.to_owned(), if v.is_empty() { None } else { Some(v) })
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let (architecture, variant) = normalize_arch(architecture, variant.unwrap_or(""));
        Platform {
            os: normalize_os(os),
            architecture,
            variant,
        }
    }

    /// The platform this binary runs on (always Linux for coral).
    pub fn host() -> Platform {
        Platform::new("linux", std::env::consts::ARCH, None)
    }

    pub fn os(&self) -> &str {
        &self.os
    }
    pub fn architecture(&self) -> &str {
        &self.architecture
    }
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// The platforms an image may have to run where `self` is wanted, best
    /// first, as containerd's `platforms.Only` builds them: a newer amd64
    /// level runs older ones and 386; an ARM level runs the older ARM levels
    /// down to v5; arm64 also runs 32-bit ARM.
    pub fn compatible(&self) -> Vec<Platform> {
        let with = |arch: &str, variant: Option<String>| Platform {
            os: self.os.clone(),
            architecture: arch.to_owned(),
            variant,
        };
        let level = |v: Option<&str>| {
            v.and_then(|v| v.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
        };
        let mut out = vec![self.clone()];
        match self.architecture.as_str() {
            "amd64" => {
                if let Some(n) = level(self.variant()).filter(|n| *n > 1) {
                    for l in (1..n).rev() {
                        out.push(with("amd64", (l > 1).then(|| format!("v{l}"))));
                    }
                }
                out.push(with("386", None));
            }
            "arm" => {
                if let Some(n) = level(self.variant()).filter(|n| *n > 5) {
                    out.extend((5..n).rev().map(|l| with("arm", Some(format!("v{l}")))));
                }
            }
            "arm64" => {
                let n = level(self.variant()).unwrap_or(8);
                out.extend((5..=n).rev().map(|l| with("arm", Some(format!("v{l}")))));
            }
            _ => {}
        }
        out
    }

    /// Whether an image manifest for `candidate` can run where `self` is wanted.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.preference(candidate).is_some()
    }

    /// How good a match `candidate` is (0 is exact; `None`: it cannot run here).
    /// Choosing the lowest picks the manifest containerd itself would pick.
    pub fn preference(&self, candidate: &Platform) -> Option<usize> {
        self.compatible().iter().position(|p| p == candidate)
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = input.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
            return Err(PlatformError::Format(input.to_owned()));
        }
        let unknown = |part: &str| PlatformError::Unknown {
            input: input.to_owned(),
            part: part.to_owned(),
        };
        match parts.as_slice() {
            [one] => {
                let os = normalize_os(one);
                if KNOWN_OS.contains(&os.as_str()) {
                    // An OS alone means that OS on this machine's architecture.
                    Ok(Platform::new(&os, std::env::consts::ARCH, None))
                } else {
                    let (arch, variant) = normalize_arch(one, "");
                    if KNOWN_ARCH.contains(&arch.as_str()) {
                        Ok(Platform::new("linux", &arch, variant.as_deref()))
                    } else {
                        Err(unknown(one))
                    }
                }
            }
            [os, arch] | [os, arch, _] => {
                let variant = parts.get(2).copied();
                let p = Platform::new(os, arch, variant);
                if !KNOWN_OS.contains(&p.os.as_str()) {
                    return Err(unknown(os));
                }
                if !KNOWN_ARCH.contains(&p.architecture.as_str()) {
                    return Err(unknown(arch));
                }
                Ok(p)
            }
            _ => Err(PlatformError::Format(input.to_owned())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Platform({self})")
    }
}

impl Serialize for Platform {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Platform {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_and_normalises_like_containerd() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/v9.0", "linux/arm64/v9"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("Linux/AMD64", "linux/amd64"),
            ("arm64", "linux/arm64"),
            ("macos/arm64", "darwin/arm64"),
            ("windows/amd64", "windows/amd64"),
        ];
        for (input, want) in cases {
            assert_eq!(p(input).to_string(), want, "{input}");
        }
        // An OS alone takes this machine's architecture.
        assert_eq!(p("linux"), Platform::host());
    }

    #[test]
    fn rejects_malformed_and_unknown_platforms() {
        for bad in [
            "",
            "/",
            "linux/",
            "linux//v7",
            "linux/amd64/v1/x",
            "plan10/amd64",
            "linux/z80",
            "frobnicate",
        ] {
            assert!(
                bad.parse::<Platform>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        let err = "linux/z80".parse::<Platform>().unwrap_err().to_string();
        assert!(err.contains("\"z80\""), "{err}");
    }

    #[test]
    fn matching_follows_containerd_only_rules() {
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64").matches(&p("linux/arm/v7")));
        assert!(p("linux/arm64").matches(&p("linux/arm/v6")));
        assert!(p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/amd64/v3")));
        assert!(p("linux/amd64/v3").matches(&p("linux/amd64/v2")));
        assert!(p("linux/amd64/v3").matches(&p("linux/amd64")));
        assert!(p("linux/amd64").matches(&p("linux/386")));
        assert!(!p("linux/386").matches(&p("linux/amd64")));
    }

    #[test]
    fn preference_orders_exact_before_fallbacks() {
        let host = p("linux/amd64/v3");
        assert_eq!(host.preference(&p("linux/amd64/v3")), Some(0));
        assert!(host.preference(&p("linux/amd64/v2")) < host.preference(&p("linux/amd64")));
        assert!(host.preference(&p("linux/amd64")) < host.preference(&p("linux/386")));
        let arm = p("linux/arm64");
        assert!(arm.preference(&p("linux/arm64/v8")) < arm.preference(&p("linux/arm/v7")));
        assert_eq!(arm.preference(&p("linux/s390x")), None);
    }

    #[test]
    fn host_platform_is_linux_and_normalised() {
        let h = Platform::host();
        assert_eq!(h.os(), "linux");
        assert_eq!(h, p(&h.to_string()));
    }
}
