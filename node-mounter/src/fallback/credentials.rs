//! Registry credentials for CRI pulls, found the way kubelet finds them, so
//! an image coral pulls at boot is pulled with the credentials kubelet would
//! have used for it later:
//!
//! - a docker config file (`config.json` with `auths`, or the legacy
//!   `.dockercfg` map): `auth` (base64 `user:password`) or
//!   `username`/`password` per registry key;
//! - kubelet's image credential provider plugins (the exec protocol of
//!   `credentialprovider.kubelet.k8s.io`, which is how ECR credentials reach
//!   EKS nodes): a `CredentialProviderConfig` names each plugin, the images
//!   it serves (`matchImages`) and how long its answers are cached; the
//!   plugin `<bin-dir>/<name>` gets a `CredentialProviderRequest` on stdin
//!   and answers a `CredentialProviderResponse` on stdout.
//!
//! Matching follows kubelet's keyring: the image is its normalised name
//! without tag or digest (`docker.io/library/ubuntu`, as kubelet passes it);
//! a key or `matchImages` entry is `host[:port][/path]` where each
//! dot-separated part of the host is a glob (`*.dkr.ecr.*.amazonaws.com`;
//! one `*` never spans a dot), the port must be equal (absent on both or
//! the same), the path must be a prefix of the image's path, and more
//! specific keys are tried first. Docker Hub images also get the
//! `index.docker.io` entry of a docker config.
//!
//! A plugin that fails is logged and skipped (kubelet does the same: the pull
//! then goes on with the other credentials, or anonymously), and the reason
//! is kept so that a pull that then fails can say why.
//!
//! Secrets never reach logs, errors or the status file: credential types
//! redact themselves in `Debug`, and a plugin's stdout (which holds the
//! secret) is never quoted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

/// The request/response API versions kubelet speaks to plugins.
const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
/// The versions of the config file itself.
const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
/// kubelet's catch-all limit for one plugin run; a plugin may retry its own
/// requests within it, but may not hang the boot.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a failing plugin's stderr is quoted in an error.
const STDERR_QUOTE: usize = 300;
/// The docker config key kubelet falls back to for Docker Hub images.
const DEFAULT_REGISTRY_KEY: &str = "index.docker.io";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config {path} is not a docker config.json: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
    #[error("docker config {path}, entry {registry:?}: {reason}")]
    DockerEntry {
        path: PathBuf,
        registry: String,
        reason: String,
    },
    #[error("credential provider config {path}: {reason}")]
    ProviderConfig { path: PathBuf, reason: String },
}

/// Where a credential came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    DockerConfig,
    Provider(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::DockerConfig => f.write_str("the docker config"),
            Origin::Provider(name) => write!(f, "credential provider {name}"),
        }
    }
}

/// A username and password to offer a registry (through CRI's AuthConfig).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    pub username: String,
    pub password: String,
    pub origin: Origin,
}

/// Never prints the password.
impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

/// What a lookup found: credentials to try in order (none: pull
/// anonymously), and the problems met on the way (failed plugins).
#[derive(Debug, Default)]
pub struct Lookup {
    pub credentials: Vec<RegistryCredential>,
    pub problems: Vec<String>,
}

/// Every source of credentials a node has.
#[derive(Debug, Default)]
pub struct Credentials {
    docker: Keyring,
    providers: Vec<Provider>,
}

impl Credentials {
    /// No credentials: every pull is anonymous.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// Adds the `auths` of a docker config file. Entries are decoded now,
    /// so a broken one is reported (by registry, never by value) before any
    /// pull starts.
    pub fn load_docker_config(&mut self, path: &Path) -> Result<(), CredentialError> {
        let text = std::fs::read(path).map_err(|source| CredentialError::Read {
            what: "docker config",
            path: path.to_owned(),
            source,
        })?;
        let bad = |reason: String| CredentialError::DockerConfig {
            path: path.to_owned(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let serde_json::Value::Object(mut top) = value else {
            return Err(bad("not a JSON object".into()));
        };
        if top.contains_key("credHelpers") || top.contains_key("credsStore") {
            tracing::warn!(
                path = %path.display(),
                "credHelpers/credsStore in the docker config are ignored (kubelet ignores them too); \
                 use a kubelet credential provider for dynamic credentials"
            );
        }
        // config.json keeps entries under "auths"; the legacy .dockercfg is
        // the map itself (kubelet reads both).
        let entries = match top.remove("auths") {
            Some(serde_json::Value::Object(auths)) => auths,
            Some(_) => return Err(bad("\"auths\" is not an object".into())),
            None => top
                .into_iter()
                .filter(|(_, v)| v.get("auth").is_some() || v.get("username").is_some())
                .collect(),
        };
        for (registry, entry) in entries {
            let entry_err = |reason: &str| CredentialError::DockerEntry {
                path: path.to_owned(),
                registry: registry.clone(),
                reason: reason.into(),
            };
            let entry: DockerAuthEntry =
                serde_json::from_value(entry).map_err(|_| entry_err("not an auth entry"))?;
            let Some((username, password)) = entry.decode().map_err(entry_err)? else {
                continue;
            };
            self.docker.add(
                &registry,
                RegistryCredential {
                    username,
                    password,
                    origin: Origin::DockerConfig,
                },
            );
        }
        Ok(())
    }

    /// Adds kubelet's credential provider plugins: `config` as kubelet's
    /// `--image-credential-provider-config`, `bin_dir` as its
    /// `--image-credential-provider-bin-dir`. Validated as kubelet does, so a
    /// config kubelet would refuse is refused here too.
    pub fn load_providers(&mut self, config: &Path, bin_dir: &Path) -> Result<(), CredentialError> {
        let text = std::fs::read(config).map_err(|source| CredentialError::Read {
            what: "credential provider config",
            path: config.to_owned(),
            source,
        })?;
        let bad = |reason: String| CredentialError::ProviderConfig {
            path: config.to_owned(),
            reason,
        };
        // YAML, or JSON (which YAML reads too).
        let file: ProviderConfigFile =
            serde_norway::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if file.kind.as_deref() != Some("CredentialProviderConfig") {
            return Err(bad(format!(
                "kind is {:?}, not CredentialProviderConfig",
                file.kind.unwrap_or_default()
            )));
        }
        let api = file.api_version.unwrap_or_default();
        if !CONFIG_API_VERSIONS.contains(&api.as_str()) {
            return Err(bad(format!(
                "apiVersion {api:?} is not one of {CONFIG_API_VERSIONS:?}"
            )));
        }
        if file.providers.is_empty() {
            return Err(bad("no providers".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        for spec in file.providers {
            let provider = Provider::from_spec(spec, bin_dir).map_err(&bad)?;
            if !names.insert(provider.name.clone()) {
                return Err(bad(format!("provider {} is named twice", provider.name)));
            }
            if provider.needs_service_account {
                tracing::info!(
                    provider = %provider.name,
                    "credential provider requires a pod's service account token: not used at node bootstrap"
                );
                continue;
            }
            self.providers.push(provider);
        }
        Ok(())
    }

    /// The credentials to try for `image`, the normalised image name without
    /// tag or digest (`registry/repository`, as kubelet looks it up): the
    /// docker config's first, then each matching plugin's, in config order.
    pub async fn lookup(&self, image: &str) -> Lookup {
        let mut found = Lookup {
            credentials: self.docker.lookup(image),
            problems: Vec::new(),
        };
        for provider in &self.providers {
            match provider.provide(image).await {
                Ok(creds) => {
                    for c in creds {
                        if !found
                            .credentials
                            .iter()
                            .any(|f| f.username == c.username && f.password == c.password)
                        {
                            found.credentials.push(c);
                        }
                    }
                }
                Err(problem) => {
                    tracing::warn!(image, provider = %provider.name, "{problem}");
                    found.problems.push(problem);
                }
            }
        }
        found
    }

    /// Drops every cached plugin answer that would serve `image`, so the
    /// next lookup asks the plugins again (after the registry refused the
    /// credentials they gave: a token may have expired early).
    pub async fn forget(&self, image: &str) {
        for provider in &self.providers {
            provider.forget(image).await;
        }
    }
}

#[derive(Deserialize)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerAuthEntry {
    /// `auth` wins over `username`/`password`, as in kubelet; an entry with
    /// neither (an identity token, say) is no credential.
    fn decode(&self) -> Result<Option<(String, String)>, &'static str> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "\"auth\" is not valid base64")?;
            let text = String::from_utf8(raw).map_err(|_| "\"auth\" is not UTF-8")?;
            let (u, p) = text
                .split_once(':')
                .ok_or("\"auth\" does not decode to user:password")?;
            return Ok(Some((u.to_owned(), p.to_owned())));
        }
        match (&self.username, &self.password) {
            (Some(u), p) if !u.is_empty() => Ok(Some((u.clone(), p.clone().unwrap_or_default()))),
            _ => Ok(None),
        }
    }
}

/// Credentials by registry key, looked up as kubelet's `BasicDockerKeyring`.
#[derive(Debug, Default, Clone)]
struct Keyring {
    /// Sorted by key, reverse lexicographically, so that a longer (more
    /// specific) key is tried before its prefix.
    entries: Vec<(String, RegistryCredential)>,
}

impl Keyring {
    /// Adds a credential for `location`: a key as docker configs and plugin
    /// responses spell it (`https://index.docker.io/v1/`, `host:port`,
    /// `*.azurecr.io`, `quay.io/org`).
    fn add(&mut self, location: &str, credential: RegistryCredential) {
        let schemeless = strip_scheme(location);
        let (host, path) = match schemeless.find('/') {
            Some(i) => schemeless.split_at(i),
            None => (schemeless, ""),
        };
        // Docker treats `/v1/` and `/v2/` as the bare host.
        let path = if path.starts_with("/v1/") || path.starts_with("/v2/") {
            &path[3..]
        } else {
            path
        };
        let key = if path.is_empty() || path == "/" {
            host.to_owned()
        } else {
            format!("{host}{path}")
        };
        self.entries.push((key, credential));
        self.entries.sort_by(|a, b| b.0.cmp(&a.0));
    }

    fn lookup(&self, image: &str) -> Vec<RegistryCredential> {
        let found: Vec<RegistryCredential> = self
            .entries
            .iter()
            .filter(|(key, _)| url_matches(key, image))
            .map(|(_, c)| c.clone())
            .collect();
        if !found.is_empty() || !is_docker_hub(image) {
            return found;
        }
        self.entries
            .iter()
            .filter(|(key, _)| key == DEFAULT_REGISTRY_KEY)
            .map(|(_, c)| c.clone())
            .collect()
    }
}

fn strip_scheme(s: &str) -> &str {
    s.strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s)
}

/// Whether an image name lives on Docker Hub (no registry host in it, or
/// `docker.io` / `index.docker.io`).
fn is_docker_hub(image: &str) -> bool {
    let mut parts = image.splitn(2, '/');
    let first = parts.next().unwrap_or("");
    if first.is_empty() {
        return false;
    }
    if parts.next().is_none() {
        return true;
    }
    first == "docker.io"
        || first == "index.docker.io"
        || (!first.contains(['.', ':']) && first != "localhost")
}

/// A `host[:port][/path]` split for matching.
struct UrlParts<'a> {
    host: Vec<&'a str>,
    port: &'a str,
    path: &'a str,
}

fn split_url(s: &str) -> UrlParts<'_> {
    let s = strip_scheme(s);
    let (authority, path) = match s.find('/') {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once("]:") {
            Some((h, p)) => (h, p),
            None => (authority, ""),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, p),
            _ => (authority, ""),
        }
    };
    UrlParts {
        host: host.split('.').collect(),
        port,
        path,
    }
}

/// kubelet's `URLsMatch`: `glob` (`*.dkr.ecr.*.amazonaws.com`,
/// `registry.io:8080/path`) against `target` (an image name). Globs are
/// per host part; the port must be equal and the glob's path a prefix of
/// the target's. A malformed glob matches nothing.
pub fn url_matches(glob: &str, target: &str) -> bool {
    let g = split_url(glob);
    let t = split_url(target);
    g.port == t.port
        && g.host.len() == t.host.len()
        && t.path.starts_with(g.path)
        && g.host
            .iter()
            .zip(&t.host)
            .all(|(g, t)| glob_match(g, t).unwrap_or(false))
}

#[derive(Debug)]
enum Token {
    Star,
    Any,
    Char(char),
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Go's `filepath.Match` for one host part: `*`, `?`, `[a-z]`, `[^…]` and
/// `\` escapes. `None` if the pattern is malformed.
fn glob_match(pattern: &str, name: &str) -> Option<bool> {
    let tokens = tokenize(pattern)?;
    let name: Vec<char> = name.chars().collect();
    let single = |t: &Token, c: char| match t {
        Token::Any => true,
        Token::Char(x) => *x == c,
        Token::Class { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
        }
        Token::Star => unreachable!("stars are handled by the caller"),
    };
    // Two cursors, backtracking only to the last star: linear in practice.
    let (mut ti, mut ni) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while ni < name.len() {
        match tokens.get(ti) {
            Some(Token::Star) => {
                last_star = Some((ti, ni));
                ti += 1;
            }
            Some(t) if single(t, name[ni]) => {
                ti += 1;
                ni += 1;
            }
            _ => match last_star {
                Some((st, sn)) => {
                    last_star = Some((st, sn + 1));
                    ti = st + 1;
                    ni = sn + 1;
                }
                None => return Some(false),
            },
        }
    }
    Some(tokens[ti..].iter().all(|t| matches!(t, Token::Star)))
}

fn tokenize(pattern: &str) -> Option<Vec<Token>> {
    let mut chars = pattern.chars().peekable();
    let mut tokens = Vec::new();
    // A class member: a character, `\`-escaped or not; an unescaped `-` or
    // `]` is malformed there (as in Go).
    fn member(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<char> {
        match chars.next()? {
            '\\' => chars.next(),
            '-' | ']' => None,
            c => Some(c),
        }
    }
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => Token::Star,
            '?' => Token::Any,
            '\\' => Token::Char(chars.next()?),
            '[' => {
                let negated = chars.next_if_eq(&'^').is_some();
                let mut ranges = Vec::new();
                loop {
                    if !ranges.is_empty() && chars.next_if_eq(&']').is_some() {
                        break;
                    }
                    let lo = member(&mut chars)?;
                    let hi = if chars.next_if_eq(&'-').is_some() {
                        member(&mut chars)?
                    } else {
                        lo
                    };
                    ranges.push((lo, hi));
                }
                Token::Class { negated, ranges }
            }
            c => Token::Char(c),
        });
    }
    Some(tokens)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderConfigFile {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    token_attributes: Option<TokenAttributes>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenAttributes {
    #[serde(default)]
    require_service_account: Option<bool>,
}

/// One exec plugin, with its cache of answers.
#[derive(Debug)]
struct Provider {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    api_version: String,
    match_images: Vec<String>,
    default_cache_duration: Duration,
    /// Plugins that exchange a pod's service account token cannot serve a
    /// node-level pull.
    needs_service_account: bool,
    /// Held while the plugin runs, so concurrent pulls of one registry run
    /// it once and share its answer (kubelet's singleflight).
    cache: tokio::sync::Mutex<Vec<CacheEntry>>,
}

#[derive(Debug)]
struct CacheEntry {
    key: CacheKey,
    keyring: Keyring,
    expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CacheKey {
    Image(String),
    Registry(String),
    Global,
}

impl CacheKey {
    fn serves(&self, image: &str) -> bool {
        match self {
            CacheKey::Image(i) => i == image,
            CacheKey::Registry(r) => r == registry_of(image),
            CacheKey::Global => true,
        }
    }
}

/// The registry part of an image name (kubelet's `parseRegistry`).
fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginResponse {
    api_version: Option<String>,
    kind: Option<String>,
    cache_key_type: Option<String>,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, PluginAuth>,
}

#[derive(Deserialize)]
struct PluginAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

impl Provider {
    fn from_spec(spec: ProviderSpec, bin_dir: &Path) -> Result<Provider, String> {
        let name = spec.name;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(format!("provider name {name:?} is not a file name"));
        }
        if spec.match_images.is_empty() {
            return Err(format!("provider {name}: matchImages is empty"));
        }
        if let Some(m) = spec
            .match_images
            .iter()
            .find(|m| m.is_empty() || split_url(m).host.iter().any(|p| tokenize(p).is_none()))
        {
            return Err(format!(
                "provider {name}: matchImages entry {m:?} is malformed"
            ));
        }
        let default_cache_duration = match spec.default_cache_duration.as_deref() {
            Some(d) => coral_seed::time::parse_duration(d)
                .map_err(|e| format!("provider {name}: defaultCacheDuration: {e}"))?,
            None => return Err(format!("provider {name}: defaultCacheDuration is required")),
        };
        if !PLUGIN_API_VERSIONS.contains(&spec.api_version.as_str()) {
            return Err(format!(
                "provider {name}: apiVersion {:?} is not one of {PLUGIN_API_VERSIONS:?}",
                spec.api_version
            ));
        }
        let bin = bin_dir.join(&name);
        if !bin.is_file() {
            return Err(format!(
                "provider {name}: plugin {} does not exist",
                bin.display()
            ));
        }
        Ok(Provider {
            bin,
            args: spec.args,
            env: spec.env.into_iter().map(|e| (e.name, e.value)).collect(),
            api_version: spec.api_version,
            match_images: spec.match_images,
            default_cache_duration,
            needs_service_account: spec
                .token_attributes
                .is_some_and(|t| t.require_service_account.unwrap_or(true)),
            cache: tokio::sync::Mutex::new(Vec::new()),
            name,
        })
    }

    /// This plugin's credentials for `image` (none if it does not serve it),
    /// from the cache or a fresh run.
    async fn provide(&self, image: &str) -> Result<Vec<RegistryCredential>, String> {
        if !self.match_images.iter().any(|m| url_matches(m, image)) {
            return Ok(Vec::new());
        }
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        cache.retain(|e| e.expires > now);
        // Most specific first, as kubelet looks them up.
        for want in [
            CacheKey::Image(image.to_owned()),
            CacheKey::Registry(registry_of(image).to_owned()),
            CacheKey::Global,
        ] {
            if let Some(e) = cache.iter().find(|e| e.key == want) {
                return Ok(e.keyring.lookup(image));
            }
        }
        let (key, keyring, ttl) = self.run(image).await?;
        let found = keyring.lookup(image);
        if !ttl.is_zero() {
            cache.retain(|e| e.key != key);
            cache.push(CacheEntry {
                key,
                keyring,
                expires: now + ttl,
            });
        }
        Ok(found)
    }

    async fn forget(&self, image: &str) {
        if self.match_images.iter().any(|m| url_matches(m, image)) {
            self.cache.lock().await.retain(|e| !e.key.serves(image));
        }
    }

    /// Runs the plugin for `image`: its answer as a keyring, with the cache
    /// key and lifetime it asked for.
    async fn run(&self, image: &str) -> Result<(CacheKey, Keyring, Duration), String> {
        let fail = |what: String| format!("credential provider {} for {image}: {what}", self.name);
        let request = serde_json::json!({
            "apiVersion": self.api_version,
            "kind": "CredentialProviderRequest",
            "image": image,
        });
        let mut child = tokio::process::Command::new(&self.bin)
            .args(&self.args)
            // The node's environment plus the configured variables, which win.
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", self.bin.display())))?;
        let mut stdin = child.stdin.take().expect("piped");
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, async move {
            // A plugin may exit without reading its request; its exit status says more.
            let _ = stdin.write_all(request.to_string().as_bytes()).await;
            drop(stdin);
            child.wait_with_output().await
        })
        .await
        .map_err(|_| fail(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            let stderr: String = String::from_utf8_lossy(&output.stderr)
                .trim()
                .chars()
                .take(STDERR_QUOTE)
                .collect();
            return Err(fail(format!("exited with {}: {stderr}", output.status)));
        }
        // The answer holds the secret: errors describe it, never quote it.
        let response: PluginResponse = serde_json::from_slice(&output.stdout)
            .map_err(|_| fail("its answer is not a CredentialProviderResponse".into()))?;
        if response.api_version.as_deref() != Some(self.api_version.as_str()) {
            return Err(fail(format!(
                "answered apiVersion {:?}, expected {:?}",
                response.api_version.unwrap_or_default(),
                self.api_version
            )));
        }
        if response.kind.as_deref() != Some("CredentialProviderResponse") {
            return Err(fail(
                "its answer is not a CredentialProviderResponse".into(),
            ));
        }
        let key = match response.cache_key_type.as_deref() {
            Some("Image") => CacheKey::Image(image.to_owned()),
            Some("Registry") => CacheKey::Registry(registry_of(image).to_owned()),
            Some("Global") => CacheKey::Global,
            other => {
                return Err(fail(format!(
                    "cacheKeyType {:?} is not Image, Registry or Global",
                    other.unwrap_or_default()
                )));
            }
        };
        let ttl = match response.cache_duration.as_deref() {
            Some(d) => coral_seed::time::parse_duration(d)
                .map_err(|e| fail(format!("cacheDuration: {e}")))?,
            None => self.default_cache_duration,
        };
        let mut keyring = Keyring::default();
        for (location, auth) in response.auth {
            keyring.add(
                &location,
                RegistryCredential {
                    username: auth.username,
                    password: auth.password,
                    origin: Origin::Provider(self.name.clone()),
                },
            );
        }
        tracing::debug!(provider = %self.name, image, ?key, ?ttl, "credential provider answered");
        Ok((key, keyring, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_globs_match_one_part_each() {
        let m = url_matches;
        assert!(m(
            "*.dkr.ecr.*.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/app"
        ));
        assert!(!m(
            "*.dkr.ecr.*.amazonaws.com",
            "dkr.ecr.us-east-1.amazonaws.com/app"
        ));
        assert!(
            !m("*.io", "registry.k8s.io/pause"),
            "a star never spans a dot"
        );
        assert!(m("*.k8s.io", "registry.k8s.io/pause"));
        assert!(m("k8s.*", "k8s.io/x"));
        assert!(m("app*.k8s.io", "app1.k8s.io/x"));
        assert!(!m("app*.k8s.io", "web.k8s.io/x"));
        assert!(m("gcr.io", "gcr.io/project/image"));
        assert!(!m("gcr.io", "us.gcr.io/project/image"));
        assert!(m("reg?.io", "reg1.io/x"));
        assert!(m("reg[0-9].io", "reg7.io/x"));
        assert!(!m("reg[^0-9].io", "reg7.io/x"));
        assert!(
            !m("reg[.io", "reg[.io/x"),
            "a malformed glob matches nothing"
        );
        assert!(m(r"reg\*.io", "reg*.io/x"));
    }

    #[test]
    fn ports_must_be_equal_and_paths_prefixes() {
        let m = url_matches;
        assert!(m("registry.io:8080/path", "registry.io:8080/path/image"));
        assert!(
            m("registry.io:8080/path", "registry.io:8080/pathology"),
            "a string prefix, as kubelet"
        );
        assert!(!m("registry.io:8080/path", "registry.io:8080/other/image"));
        assert!(!m("registry.io:8080", "registry.io/image"));
        assert!(!m("registry.io", "registry.io:8080/image"));
        assert!(m("*.*.*.*:5000", "127.0.0.1:5000/coral/tiny"));
        assert!(!m("*.*.*.*:5000", "127.0.0.1:5001/coral/tiny"));
        assert!(
            m("https://quay.io", "quay.io/org/app"),
            "a scheme is ignored"
        );
    }

    #[test]
    fn globs_behave_like_go_filepath_match() {
        let g = |p: &str, s: &str| glob_match(p, s);
        assert_eq!(g("*", ""), Some(true));
        assert_eq!(g("a*b*c", "axxbyyc"), Some(true));
        assert_eq!(g("a*b*c", "axxbyy"), Some(false));
        assert_eq!(g("*x", "xxxx"), Some(true));
        assert_eq!(g("[a-c]*", "bz"), Some(true));
        assert_eq!(g("[]a]", "a"), None);
        assert_eq!(g("[a-]", "a"), None);
        assert_eq!(g("x\\", "x"), None);
        assert_eq!(g("[\\]]", "]"), Some(true));
    }

    fn cred(user: &str) -> RegistryCredential {
        RegistryCredential {
            username: user.into(),
            password: "pw".into(),
            origin: Origin::DockerConfig,
        }
    }

    #[test]
    fn keyring_prefers_specific_keys_and_knows_docker_hub() {
        let mut k = Keyring::default();
        k.add("quay.io", cred("host"));
        k.add("https://quay.io/org/", cred("org"));
        k.add("https://index.docker.io/v1/", cred("hub"));
        k.add("http://127.0.0.1:5000", cred("local"));
        let users = |image: &str| {
            k.lookup(image)
                .into_iter()
                .map(|c| c.username)
                .collect::<Vec<_>>()
        };
        assert_eq!(users("quay.io/org/app"), ["org", "host"]);
        assert_eq!(users("quay.io/other/app"), ["host"]);
        assert_eq!(users("docker.io/library/ubuntu"), ["hub"]);
        assert_eq!(users("127.0.0.1:5000/coral/tiny"), ["local"]);
        assert!(users("127.0.0.1:5001/coral/tiny").is_empty());
        assert!(users("ghcr.io/org/app").is_empty());
    }

    #[test]
    fn docker_configs_decode_auth_and_username_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:with:colons");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "reg.example:5000": {{"auth": "{b64}"}},
                    "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}},
                    "token.example": {{"identitytoken": "x"}}
                }}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let mut c = Credentials::anonymous();
        c.load_docker_config(&path).unwrap();
        let found = c.docker.lookup("reg.example:5000/app");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].username, "alice");
        assert_eq!(found[0].password, "s3cret:with:colons");
        assert_eq!(
            c.docker.lookup("docker.io/library/busybox")[0].username,
            "bob"
        );
        assert!(c.docker.lookup("token.example/app").is_empty());
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug redacts passwords"
        );

        std::fs::write(&path, r#"{"auths": {"reg.example": {"auth": "!!!"}}}"#).unwrap();
        let e = Credentials::anonymous()
            .load_docker_config(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reg.example") && e.contains("base64"), "{e}");
        assert!(!e.contains("!!!"), "the value is never quoted: {e}");

        // The legacy .dockercfg layout: the map itself.
        std::fs::write(
            &path,
            r#"{"legacy.example": {"username": "carol", "password": "pw"}}"#,
        )
        .unwrap();
        let mut c = Credentials::anonymous();
        c.load_docker_config(&path).unwrap();
        assert_eq!(c.docker.lookup("legacy.example/app")[0].username, "carol");
    }

    fn write_plugin(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn provider_config(dir: &Path, providers: &str) -> PathBuf {
        let p = dir.join("providers.yaml");
        std::fs::write(
            &p,
            format!("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n{providers}"),
        )
        .unwrap();
        p
    }

    #[tokio::test]
    async fn plugins_are_run_for_matching_images_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        write_plugin(
            dir.path(),
            "fake",
            &format!(
                r#"read req; echo "$req $1 $FAKE_ENV" >> {log}
echo '{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1h","auth":{{"*.example.com":{{"username":"u","password":"p"}}}}}}'"#,
                log = log.display()
            ),
        );
        let config = provider_config(
            dir.path(),
            "- name: fake\n  matchImages: [\"*.example.com\"]\n  defaultCacheDuration: 10m\n  \
             apiVersion: credentialprovider.kubelet.k8s.io/v1\n  args: [get-credentials]\n  \
             env: [{name: FAKE_ENV, value: from-config}]\n",
        );
        let mut c = Credentials::anonymous();
        c.load_providers(&config, dir.path()).unwrap();

        let found = c.lookup("reg.example.com/app").await;
        assert_eq!(found.credentials.len(), 1, "{found:?}");
        assert_eq!(found.credentials[0].origin, Origin::Provider("fake".into()));
        // Same registry: served from the cache. No match: not run at all.
        assert_eq!(c.lookup("reg.example.com/other").await.credentials.len(), 1);
        assert!(c.lookup("ghcr.io/app").await.credentials.is_empty());
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(calls.lines().count(), 1, "{calls}");
        assert!(
            calls.contains(r#""image":"reg.example.com/app""#),
            "{calls}"
        );
        assert!(
            calls.contains(r#""kind":"CredentialProviderRequest""#),
            "{calls}"
        );
        assert!(calls.contains("get-credentials from-config"), "{calls}");

        // After a refusal the cached answer is dropped: the plugin runs again.
        c.forget("reg.example.com/app").await;
        c.lookup("reg.example.com/app").await;
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
    }

    #[tokio::test]
    async fn failing_or_lying_plugins_are_reported_without_their_output() {
        let dir = tempfile::tempdir().unwrap();
        write_plugin(
            dir.path(),
            "broken",
            "echo 'no metadata service' >&2; exit 3",
        );
        write_plugin(
            dir.path(),
            "wrongversion",
            r#"echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1beta1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"x.io":{"username":"u","password":"TOPSECRET"}}}'"#,
        );
        write_plugin(dir.path(), "garbage", "echo 'password=TOPSECRET'");
        let spec = |name: &str| {
            format!(
                "- name: {name}\n  matchImages: [x.io]\n  defaultCacheDuration: 0s\n  \
                 apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
            )
        };
        let config = provider_config(
            dir.path(),
            &[spec("broken"), spec("wrongversion"), spec("garbage")].concat(),
        );
        let mut c = Credentials::anonymous();
        c.load_providers(&config, dir.path()).unwrap();
        let found = c.lookup("x.io/app").await;
        assert!(found.credentials.is_empty());
        let problems = found.problems.join("\n");
        assert_eq!(found.problems.len(), 3, "{problems}");
        assert!(problems.contains("no metadata service"), "{problems}");
        assert!(problems.contains("v1beta1"), "{problems}");
        assert!(!problems.contains("TOPSECRET"), "{problems}");
    }

    #[test]
    fn provider_configs_are_validated_as_kubelet_does() {
        let dir = tempfile::tempdir().unwrap();
        write_plugin(dir.path(), "ok", "exit 0");
        let load = |providers: &str| {
            let config = provider_config(dir.path(), providers);
            Credentials::anonymous()
                .load_providers(&config, dir.path())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let v1 = "apiVersion: credentialprovider.kubelet.k8s.io/v1";
        assert!(
            load(&format!(
                "- name: ok\n  matchImages: [x.io]\n  defaultCacheDuration: 1m\n  {v1}\n"
            ))
            .is_ok()
        );
        let e = load(&format!(
            "- name: missing\n  matchImages: [x.io]\n  defaultCacheDuration: 1m\n  {v1}\n"
        ));
        assert!(e.unwrap_err().contains("does not exist"));
        let e = load(&format!(
            "- name: ok\n  matchImages: []\n  defaultCacheDuration: 1m\n  {v1}\n"
        ));
        assert!(e.unwrap_err().contains("matchImages"));
        let e = load(&format!("- name: ok\n  matchImages: [x.io]\n  {v1}\n"));
        assert!(e.unwrap_err().contains("defaultCacheDuration"));
        let e = load(
            "- name: ok\n  matchImages: [x.io]\n  defaultCacheDuration: 1m\n  apiVersion: v9\n",
        );
        assert!(e.unwrap_err().contains("apiVersion"));
        let e = load(&format!(
            "- name: ../ok\n  matchImages: [x.io]\n  defaultCacheDuration: 1m\n  {v1}\n"
        ));
        assert!(e.unwrap_err().contains("file name"));
        let twice =
            format!("- name: ok\n  matchImages: [x.io]\n  defaultCacheDuration: 1m\n  {v1}\n");
        assert!(load(&twice.repeat(2)).unwrap_err().contains("twice"));
    }
}
