//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! server) on 127.0.0.1, plain HTTP or TLS with a self-signed certificate,
//! anonymous or with htpasswd basic auth.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::process::{Service, free_port, port_open, run};

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Serve HTTPS with a fresh self-signed certificate for IP 127.0.0.1.
    pub tls: bool,
    /// Require basic auth with this user and password.
    pub auth: Option<(String, String)>,
    /// Serve this existing storage directory instead of an empty private one.
    pub storage: Option<PathBuf>,
    /// Refuse pushes (so several registries can share one storage directory).
    pub read_only: bool,
}

pub struct Registry {
    // Field order matters: stop the service before removing its directory.
    service: Service,
    port: u16,
    options: RegistryOptions,
    ca_cert: Option<PathBuf>,
    dir: TempDir,
}

impl Registry {
    pub fn start(options: RegistryOptions) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("coral-registry-")
            .tempdir()?;
        let storage = match &options.storage {
            Some(s) => s.clone(),
            None => dir.path().join("storage"),
        };
        std::fs::create_dir_all(&storage)?;

        let mut tls_yaml = String::new();
        let mut ca_cert = None;
        if options.tls {
            let (cert, key, ca) = make_certificates(dir.path())?;
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            ca_cert = Some(ca);
        }
        let mut auth_yaml = String::new();
        if let Some((user, pass)) = &options.auth {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]))
                .context("creating an htpasswd entry (is apache2-utils installed?)")?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, line.trim_end())?;
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: coral-test\n    path: {}\n",
                htpasswd.display()
            );
        }

        // A port picked here can be taken before the registry binds it: retry.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: {ro}\n\
                     http:\n  addr: 127.0.0.1:{port}\n{tls_yaml}{auth_yaml}",
                    storage = storage.display(),
                    ro = options.read_only,
                ),
            )?;
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&config);
            let mut service =
                Service::spawn("docker-registry", cmd, &dir.path().join("registry.log"))?;
            match service.wait_until(Duration::from_secs(20), || port_open(port)) {
                Ok(()) => {
                    return Ok(Registry {
                        service,
                        port,
                        options,
                        ca_cert,
                        dir,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt")).context("starting docker-registry")
    }

    /// `127.0.0.1:PORT`, as it appears in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// The certificate to trust for a TLS registry.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.options
            .auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn is_tls(&self) -> bool {
        self.options.tls
    }

    /// A reqwest client that trusts this registry's certificate.
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &self.ca_cert {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
        }
        Ok(b.build()?)
    }

    /// The repositories the registry lists at `/v2/_catalog`.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut req = self
            .http_client()?
            .get(format!("{}/v2/_catalog?n=1000", self.url()));
        if let Some((u, p)) = self.credentials() {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await?.error_for_status()?;
        let v: serde_json::Value = resp.json().await?;
        Ok(v["repositories"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The registry's own log, for diagnosing a failed test.
    pub fn log_tail(&self) -> String {
        self.service.log_tail()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A throwaway CA and a server certificate it signed for IP 127.0.0.1
/// (rustls rightly refuses a self-signed CA certificate as a server's).
fn make_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = dir.join("ca-key.pem");
    let ca = dir.join("ca.pem");
    let key = dir.join("key.pem");
    let csr = dir.join("server.csr");
    let cert = dir.join("cert.pem");
    let ext = dir.join("server.ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=coral-test-ca", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca))
    .context("creating the test CA (is openssl installed?)")?;
    run(Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr))?;
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert))?;
    Ok((cert, key, ca))
}
