//! Image references (`[registry/]repository[:tag][@digest]`), parsed once at the
//! edge and normalised exactly as Docker and containerd do it
//! (`ubuntu` -> `docker.io/library/ubuntu:latest`), so that the names coral
//! writes into containerd are the ones CRI and kubelet look up.
//!
//! Grammar: github.com/distribution/reference (`reference.go`, `normalize.go`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{Digest, DigestError};

/// The registry Docker Hub references are normalised to.
pub const DOCKER_HUB: &str = "docker.io";
/// Hostname Docker Hub's registry API actually answers on.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference: empty")]
    Empty,
    #[error("invalid image reference {input:?}: {reason}")]
    Format { input: String, reason: String },
    #[error("invalid image reference {input:?}: repository name {repository:?} must be lowercase")]
    Uppercase { input: String, repository: String },
    #[error("invalid image reference {input:?}: repository name is longer than 255 characters")]
    NameTooLong { input: String },
    #[error(
        "invalid image reference {input:?}: cannot specify a 64-character hexadecimal image ID as a repository name"
    )]
    HexIdentifier { input: String },
    #[error("invalid image reference {input:?}: {source}")]
    Digest {
        input: String,
        #[source]
        source: DigestError,
    },
}

/// A normalised image reference. `registry` and `repository` are always set;
/// at least one of `tag` and `digest` is (a reference with neither gets the
/// `latest` tag, as Docker does).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// The registry host (and port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }
    /// The host to speak the registry API to (`docker.io` is served elsewhere).
    pub fn registry_api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }
    /// The repository path, e.g. `library/ubuntu`.
    pub fn repository(&self) -> &str {
        &self.repository
    }
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same image pinned to `digest`, without a tag: the name containerd
    /// and CRI list as the image's "repo digest" (`name@sha256:…`).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

fn format_err(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Format {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `path-component := [a-z0-9]+ (separator [a-z0-9]+)*`, separator `[_.]|__|[-]+`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: "_", "__", ".", or one or more "-".
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "_" | "__" | ".") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `domain-component := [a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn valid_domain_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
}

/// `domain := (domain-name | "[" IPv6 "]") [":" port]`.
fn valid_domain(d: &str) -> bool {
    let (host_ok, port) = match d.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) => (v6.parse::<std::net::Ipv6Addr>().is_ok(), after),
            None => return false,
        },
        None => {
            let (host, port) = d.split_at(d.find(':').unwrap_or(d.len()));
            (host.split('.').all(valid_domain_component), port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// `tag := [\w][\w.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|x| word(*x) || *x == b'.' || *x == b'-')
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.len() == 64
            && input
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ReferenceError::HexIdentifier {
                input: input.to_owned(),
            });
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format_err(
                input,
                "contains whitespace or control characters",
            ));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d
                    .parse::<Digest>()
                    .map_err(|source| ReferenceError::Digest {
                        input: input.to_owned(),
                        source,
                    })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };

        // A tag is a ':' after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(format_err(
                        input,
                        format!(
                            "invalid tag {t:?} (allowed: letters, digits, '_', '.', '-', up to 128, not starting with '.' or '-')"
                        ),
                    ));
                }
                (&rest[..last_slash + i], Some(t.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(format_err(input, "missing repository name"));
        }

        // Docker's splitDockerDomain: the first component is a registry only if
        // it looks like one (has '.' or ':', is "localhost", or has uppercase).
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first.to_owned(), remainder.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        if registry == LEGACY_DOCKER_HUB {
            registry = DOCKER_HUB.to_owned();
        }
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("{OFFICIAL_PREFIX}{repository}");
        }

        if !valid_domain(&registry) {
            return Err(format_err(
                input,
                format!("invalid registry host {registry:?}"),
            ));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase {
                input: input.to_owned(),
                repository,
            });
        }
        if let Some(bad) = repository.split('/').find(|c| !valid_path_component(c)) {
            return Err(format_err(
                input,
                format!(
                    "invalid repository path component {bad:?} (allowed: lowercase letters and digits, separated by '.', '_', '__' or dashes)"
                ),
            ));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong {
                input: input.to_owned(),
            });
        }

        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Cases from Docker's normalisation (`ParseNormalizedNamed` + `TagNameOnly`)
    /// and the distribution/reference grammar tests.
    #[test]
    fn normalises_like_docker() {
        let cases: &[(&str, &str)] = &[
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
            ("library/ubuntu", "docker.io/library/ubuntu:latest"),
            ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
            ("index.docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
            (
                "index.docker.io/library/ubuntu:1",
                "docker.io/library/ubuntu:1",
            ),
            ("foo/bar", "docker.io/foo/bar:latest"),
            (
                "nvcr.io/nvidia/pytorch:24.01-py3",
                "nvcr.io/nvidia/pytorch:24.01-py3",
            ),
            ("localhost/foo", "localhost/foo:latest"),
            ("localhost:5000/foo/bar:v1", "localhost:5000/foo/bar:v1"),
            (
                "127.0.0.1:5000/coral/tiny",
                "127.0.0.1:5000/coral/tiny:latest",
            ),
            ("[::1]:5000/foo", "[::1]:5000/foo:latest"),
            ("[2001:db8::1]/foo", "[2001:db8::1]/foo:latest"),
            (
                "Registry.Example.COM/foo",
                "Registry.Example.COM/foo:latest",
            ),
            (
                "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/app:2024.1",
                "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/app:2024.1",
            ),
            ("a/b__c/d-e--f/g.h", "docker.io/a/b__c/d-e--f/g.h:latest"),
        ];
        for (input, want) in cases {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&r.to_string(), want, "{input}");
        }
    }

    #[test]
    fn digests_with_and_without_tags() {
        let r: Reference = format!("ubuntu@{D}").parse().unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/ubuntu@{D}"));
        assert_eq!(r.tag(), None, "a digest reference gets no default tag");
        assert_eq!(r.digest().unwrap().to_string(), D);

        let r: Reference = format!("localhost:5000/app:v2@{D}").parse().unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "app");
        assert_eq!(r.tag(), Some("v2"));
        assert_eq!(r.to_string(), format!("localhost:5000/app:v2@{D}"));
        assert_eq!(
            r.with_digest(D.parse().unwrap()).to_string(),
            format!("localhost:5000/app@{D}")
        );
    }

    #[test]
    fn accessors_split_the_parts() {
        let r: Reference = "ubuntu".parse().unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.registry_api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/ubuntu");
        assert_eq!(r.name(), "docker.io/library/ubuntu");
        let r: Reference = "127.0.0.1:5000/x/y:z".parse().unwrap();
        assert_eq!(r.registry_api_host(), "127.0.0.1:5000");
    }

    #[test]
    fn rejects_invalid_references_with_the_reason() {
        let long = format!("example.com/{}", "a".repeat(250));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Ubuntu", "must be lowercase"),
            ("foo/Bar", "must be lowercase"),
            ("ubuntu:", "invalid tag"),
            ("ubuntu:-x", "invalid tag"),
            ("ubuntu:.x", "invalid tag"),
            (":latest", "missing repository"),
            ("foo//bar", "invalid repository path component"),
            ("foo/bar/", "invalid repository path component"),
            ("-foo", "invalid repository path component"),
            ("foo_", "invalid repository path component"),
            ("foo___bar", "invalid repository path component"),
            ("foo.-bar", "invalid repository path component"),
            ("ubuntu@sha256:abc", "64 lowercase hex"),
            (
                "ubuntu@md5:d41d8cd98f00b204e9800998ecf8427e",
                "unsupported algorithm",
            ),
            ("ubuntu@", "ALGORITHM:HEX"),
            ("localhost:port/foo", "invalid registry host"),
            ("-bad.com/foo", "invalid registry host"),
            ("[::1/foo", "invalid registry host"),
            ("ubuntu latest", "whitespace"),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "64-character hexadecimal",
            ),
            (long.as_str(), "longer than 255"),
        ];
        for (input, needle) in cases {
            let err = input
                .parse::<Reference>()
                .map(|r| panic!("{input:?} was accepted as {r}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
        }
        let tag = format!("ubuntu:{}", "t".repeat(129));
        assert!(
            tag.parse::<Reference>().is_err(),
            "a 129-character tag is too long"
        );
        let tag = format!("ubuntu:{}", "t".repeat(128));
        assert!(
            tag.parse::<Reference>().is_ok(),
            "128 characters is the limit, inclusive"
        );
    }

    #[test]
    fn round_trips_through_its_display_form_and_json() {
        for s in [
            "ubuntu",
            "localhost:5000/a/b:c",
            &format!("quay.io/x/y:t@{D}"),
        ] {
            let r: Reference = s.parse().unwrap();
            let again: Reference = r.to_string().parse().unwrap();
            assert_eq!(r, again);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        }
    }
}
