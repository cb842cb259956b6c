//! Registry credentials from a docker `config.json`: `auths` entries
//! (`auth` = base64 `user:password`, or `username`/`password`), and
//! credential helpers (`credHelpers` per registry, `credsStore` for all)
//! when the helper binary is installed; then Amazon ECR registries
//! (`ACCOUNT.dkr.ecr.REGION.amazonaws.com`, and hosts named with
//! `--ecr-registry`) get a token from the ECR API (GetAuthorizationToken,
//! through the AWS SDK and the standard credential chain). Registries with
//! none of these are used anonymously. Secrets never reach logs or errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading registry config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry config {path} is not a docker config.json: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry config entry for {registry}: {reason}")]
    Entry { registry: String, reason: String },
    #[error("ECR token for {registry}: {reason}")]
    Ecr { registry: String, reason: String },
    #[error("credential helper docker-credential-{helper} for {registry}: {reason}")]
    Helper {
        helper: String,
        registry: String,
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

impl DockerConfig {
    /// `bytes` (from `what`, named in the error) as a docker config.json.
    fn parse(what: &Path, bytes: &[u8]) -> Result<DockerConfig, AuthError> {
        serde_json::from_slice(bytes).map_err(|source| AuthError::Parse {
            path: what.to_path_buf(),
            source,
        })
    }
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Never prints a secret.
impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Credentials for every registry a build talks to. (Its Debug output
/// names registries, never secrets.)
#[derive(Default)]
pub struct Credentials {
    config: DockerConfig,
    /// More hosts to treat as ECR registries (e.g. behind a custom name).
    ecr_hosts: Vec<String>,
    /// ECR tokens already fetched (valid for 12 hours: longer than a build).
    ecr_tokens: tokio::sync::Mutex<BTreeMap<String, (String, String)>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("auths", &self.config.auths.keys().collect::<Vec<_>>())
            .field("cred_helpers", &self.config.cred_helpers)
            .field("creds_store", &self.config.creds_store)
            .field("ecr_hosts", &self.ecr_hosts)
            .finish_non_exhaustive()
    }
}

/// The account and region of an ECR registry host
/// (`123456789012.dkr.ecr[-fips].us-east-1.amazonaws.com[.cn]`).
pub fn ecr_host(host: &str) -> Option<(String, String)> {
    let host = host.split(':').next()?;
    let mut parts = host.split('.');
    let account = parts.next()?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if parts.next()? != "dkr" || !matches!(parts.next()?, "ecr" | "ecr-fips") {
        return None;
    }
    let region = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    (matches!(
        rest.as_slice(),
        ["amazonaws", "com"] | ["amazonaws", "com", "cn"]
    ) && !region.is_empty())
    .then(|| (account.to_string(), region.to_string()))
}

/// `https://index.docker.io/v1/` and friends → `docker.io`; otherwise the
/// host (and port) without scheme or path.
fn normalise_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        h => h.to_ascii_lowercase(),
    }
}

impl Credentials {
    /// No config: every registry anonymously.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// Reads `path`, or with `None` the first of `$DOCKER_CONFIG/config.json`
    /// and `~/.docker/config.json` that exists (none: anonymous).
    pub fn load(path: Option<&Path>) -> Result<Credentials, AuthError> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => {
                let candidates = [
                    std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")),
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
                ];
                match candidates.into_iter().flatten().find(|p| p.exists()) {
                    Some(p) => p,
                    None => return Ok(Credentials::anonymous()),
                }
            }
        };
        Credentials::load_all(&[path])
    }

    /// Reads every file of `paths` and merges them in order: a later file's
    /// entry wins for the same registry (`auths`, `credHelpers`), and its
    /// `credsStore` replaces an earlier one. (A builder Job gets one file per
    /// pull secret.) No paths: [`Credentials::load`]'s defaults.
    pub fn load_all(paths: &[PathBuf]) -> Result<Credentials, AuthError> {
        if paths.is_empty() {
            return Credentials::load(None);
        }
        let mut merged = DockerConfig::default();
        for path in paths {
            let text = std::fs::read(path).map_err(|source| AuthError::Read {
                path: path.clone(),
                source,
            })?;
            let config = DockerConfig::parse(path, &text)?;
            merged.auths.extend(config.auths);
            merged.cred_helpers.extend(config.cred_helpers);
            if config.creds_store.is_some() {
                merged.creds_store = config.creds_store;
            }
        }
        Credentials::checked(merged)
    }

    /// Credentials from the `auths` of docker config.json texts (e.g. the
    /// `.dockerconfigjson` of Kubernetes Secrets), merged in order (a later
    /// one wins for the same registry). Credential helpers and stores are
    /// refused: they would run a program a Secret names.
    pub fn from_auths(sources: &[(String, Vec<u8>)]) -> Result<Credentials, AuthError> {
        let mut merged = DockerConfig::default();
        for (what, bytes) in sources {
            let config = DockerConfig::parse(Path::new(what), bytes)?;
            if !config.cred_helpers.is_empty() || config.creds_store.is_some() {
                return Err(AuthError::Entry {
                    registry: what.clone(),
                    reason: "names a credential helper or store; only \"auths\" entries are \
                             used from here"
                        .into(),
                });
            }
            merged.auths.extend(config.auths);
        }
        Credentials::checked(merged)
    }

    /// `config` as credentials, every static entry decoded now, so that a
    /// broken one fails before any pull starts, naming the registry.
    fn checked(config: DockerConfig) -> Result<Credentials, AuthError> {
        let creds = Credentials {
            config,
            ..Credentials::default()
        };
        for key in creds.config.auths.keys() {
            creds.static_entry(key)?;
        }
        Ok(creds)
    }

    fn static_entry(&self, key: &str) -> Result<Option<RegistryAuth>, AuthError> {
        let Some(e) = self.config.auths.get(key) else {
            return Ok(None);
        };
        let registry = normalise_key(key);
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
        }
        if let Some(a) = &e.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| AuthError::Entry {
                    registry: registry.clone(),
                    reason: "\"auth\" is not valid base64".into(),
                })?;
            let text = String::from_utf8(raw).map_err(|_| AuthError::Entry {
                registry: registry.clone(),
                reason: "\"auth\" does not decode to UTF-8".into(),
            })?;
            let (u, p) = text.split_once(':').ok_or_else(|| AuthError::Entry {
                registry: registry.clone(),
                reason: "\"auth\" does not decode to user:password".into(),
            })?;
            return Ok(Some(RegistryAuth::Basic(u.into(), p.into())));
        }
        if e.identity_token.is_some() {
            return Err(AuthError::Entry {
                registry,
                reason: "identity tokens (OAuth refresh tokens) are not supported; \
                         use a username/password or a credential helper"
                    .into(),
            });
        }
        Ok(None)
    }

    /// The credentials to present to `registry` (`host[:port]`).
    pub async fn lookup(&self, registry: &str) -> Result<RegistryAuth, AuthError> {
        let registry = normalise_key(registry);
        if let Some(helper) = self.config.cred_helpers.get(&registry) {
            return run_helper(helper, &registry).await;
        }
        for key in self.config.auths.keys() {
            if normalise_key(key) == registry
                && let Some(auth) = self.static_entry(key)?
            {
                return Ok(auth);
            }
        }
        if let Some(store) = &self.config.creds_store {
            return run_helper(store, &registry).await;
        }
        let named = self.ecr_hosts.iter().any(|h| normalise_key(h) == registry);
        if let Some((_account, region)) = ecr_host(&registry) {
            return self.ecr_token(&registry, Some(region)).await;
        } else if named {
            return self.ecr_token(&registry, None).await;
        }
        Ok(RegistryAuth::Anonymous)
    }

    /// Treats `hosts` (`host[:port]`) as ECR registries too.
    pub fn with_ecr_registries(mut self, hosts: &[String]) -> Credentials {
        self.ecr_hosts.extend(hosts.iter().cloned());
        self
    }

    /// A token from ECR's GetAuthorizationToken (user `AWS`; it opens every
    /// registry the principal may read), in the registry's region (else the
    /// configured one), once per registry.
    async fn ecr_token(
        &self,
        registry: &str,
        region: Option<String>,
    ) -> Result<RegistryAuth, AuthError> {
        let mut cache = self.ecr_tokens.lock().await;
        if let Some((u, p)) = cache.get(registry) {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
        let fail = |reason: String| AuthError::Ecr {
            registry: registry.to_string(),
            reason,
        };
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(4))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(90))
                    .build(),
            );
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r));
        }
        let config = loader.load().await;
        let out = aws_sdk_ecr::Client::new(&config)
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| {
                fail(format!(
                    "GetAuthorizationToken: {}",
                    aws_sdk_ecr::error::DisplayErrorContext(&e)
                ))
            })?;
        let token = out
            .authorization_data()
            .first()
            .and_then(|d| d.authorization_token())
            .ok_or_else(|| fail("GetAuthorizationToken returned no token".into()))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| fail("the token is not base64 text".into()))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| fail("the token is not USER:PASSWORD".into()))?;
        cache.insert(registry.to_string(), (user.to_string(), pass.to_string()));
        Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()))
    }
}

/// `docker-credential-<helper> get`, with the server URL on stdin.
async fn run_helper(helper: &str, registry: &str) -> Result<RegistryAuth, AuthError> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let err = |reason: String| AuthError::Helper {
        helper: helper.into(),
        registry: registry.into(),
        reason,
    };
    if helper.contains('/') || helper.is_empty() {
        return Err(err("not a helper name".into()));
    }
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let mut child = tokio::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            err(if e.kind() == std::io::ErrorKind::NotFound {
                format!("docker-credential-{helper} is not installed (not on PATH)")
            } else {
                e.to_string()
            })
        })?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .map_err(|_| err("no answer within 60 s".into()))?
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        // Helpers print "credentials not found in native keychain" and the
        // like on stdout; it never holds a secret when they fail.
        let msg = String::from_utf8_lossy(if out.stdout.is_empty() {
            &out.stderr
        } else {
            &out.stdout
        })
        .trim()
        .chars()
        .take(300)
        .collect::<String>();
        if msg.contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        return Err(err(format!("exited with {}: {msg}", out.status)));
    }
    let reply: Reply = serde_json::from_slice(&out.stdout)
        .map_err(|_| err("its answer is not the JSON a credential helper gives".into()))?;
    Ok(RegistryAuth::Basic(reply.username, reply.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(json: &str) -> Result<Credentials, AuthError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, json).unwrap();
        Credentials::load(Some(&p))
    }

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    #[test]
    fn ecr_hosts_name_their_account_and_region() {
        let ok = |h: &str| ecr_host(h).map(|(a, r)| format!("{a} {r}"));
        assert_eq!(
            ok("123456789012.dkr.ecr.us-east-1.amazonaws.com").as_deref(),
            Some("123456789012 us-east-1")
        );
        assert_eq!(
            ok("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com:443").as_deref(),
            Some("123456789012 us-gov-west-1")
        );
        assert_eq!(
            ok("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").as_deref(),
            Some("123456789012 cn-north-1")
        );
        for not in [
            "public.ecr.aws",
            "12345.dkr.ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example",
            "123456789012.dkr.ecr..amazonaws.com",
            "docker.io",
        ] {
            assert_eq!(ok(not), None, "{not}");
        }
    }

    #[tokio::test]
    async fn auths_entries_match_by_host_and_docker_hub_aliases() {
        let c = creds(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
                "127.0.0.1:5000": {"username": "u", "password": "p:w"},
                "http://Registry.Example.com/v2/": {"auth": "YTpiOmM="}
            }}"#,
        )
        .unwrap();
        assert_eq!(
            basic(c.lookup("docker.io").await.unwrap()),
            ("hub".into(), "secret".into())
        );
        assert_eq!(
            basic(c.lookup("127.0.0.1:5000").await.unwrap()),
            ("u".into(), "p:w".into())
        );
        // Passwords may hold colons: only the first one splits.
        assert_eq!(
            basic(c.lookup("registry.example.com").await.unwrap()),
            ("a".into(), "b:c".into())
        );
        assert!(matches!(
            c.lookup("quay.io").await.unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    /// A builder Job passes one config per pull secret: all are used, and
    /// a later one wins for the same registry.
    #[tokio::test]
    async fn several_configs_merge_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.json");
        let two = dir.path().join("two.json");
        std::fs::write(
            &one,
            r#"{"auths": {"a.example": {"username": "a", "password": "1"},
                          "b.example": {"username": "b", "password": "old"}}}"#,
        )
        .unwrap();
        std::fs::write(
            &two,
            r#"{"auths": {"b.example": {"username": "b", "password": "new"}}}"#,
        )
        .unwrap();
        let c = Credentials::load_all(&[one, two]).unwrap();
        assert_eq!(
            basic(c.lookup("a.example").await.unwrap()),
            ("a".into(), "1".into())
        );
        assert_eq!(
            basic(c.lookup("b.example").await.unwrap()),
            ("b".into(), "new".into())
        );
        let missing = Credentials::load_all(&[dir.path().join("none.json")]);
        assert!(missing.unwrap_err().to_string().contains("none.json"));
    }

    #[test]
    fn broken_entries_fail_early_naming_the_registry_not_the_secret() {
        let e = creds(r#"{"auths": {"ghcr.io": {"auth": "!!!notbase64"}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "registry config entry for ghcr.io: \"auth\" is not valid base64"
        );
        let e = creds(r#"{"auths": {"ghcr.io": {"auth": "bm9jb2xvbg=="}}}"#).unwrap_err();
        assert!(e.to_string().contains("user:password"), "{e}");
        assert!(!e.to_string().contains("nocolon"), "{e}");
        let e = creds("[1,2]").unwrap_err();
        assert!(e.to_string().contains("is not a docker config.json"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_credential_helper_is_named() {
        let c = creds(
            r#"{"credHelpers": {"123.dkr.ecr.us-east-1.amazonaws.com": "coral-test-absent"}}"#,
        )
        .unwrap();
        let e = c
            .lookup("123.dkr.ecr.us-east-1.amazonaws.com")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-coral-test-absent is not installed"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_credential_helper_answers_through_stdin_and_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-coraltest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 3\n\
             printf '{\"ServerURL\":\"%s\",\"Username\":\"user-%s\",\"Secret\":\"s3cret\"}' \"$server\" \"$server\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // SAFETY: this test binary's other tests do not read PATH concurrently
        // in a way that matters (they only spawn helpers by absent names).
        unsafe { std::env::set_var("PATH", path) };
        let c = creds(r#"{"credsStore": "coraltest"}"#).unwrap();
        assert_eq!(
            basic(c.lookup("registry.example.com:443").await.unwrap()),
            ("user-registry.example.com:443".into(), "s3cret".into())
        );
    }
}
