//! moto's server, standing in for EC2 and the EBS direct APIs, on 127.0.0.1.
//! Installed by `scripts/setup` into the cache's Python venv.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::cache::cache_dir;
use crate::process::{Service, free_port, port_open};

pub struct Moto {
    service: Service,
    port: u16,
    _dir: TempDir,
}

impl Moto {
    pub fn start() -> Result<Moto> {
        let bin = cache_dir().join("venv/bin/moto_server");
        if !bin.exists() {
            bail!(
                "{} is missing: run scripts/setup (it installs moto into a venv)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("coral-moto-").tempdir()?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // No default AMIs: start-up in well under a second instead of many.
                .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
                .env("AWS_DEFAULT_REGION", "us-east-1");
            let mut service = Service::spawn("moto_server", cmd, &dir.path().join("moto.log"))?;
            match service.wait_until(Duration::from_secs(60), || port_open(port)) {
                Ok(()) => {
                    return Ok(Moto {
                        service,
                        port,
                        _dir: dir,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt")).context("starting moto_server")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An SDK configuration that talks to this server with dummy credentials.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "coral-test",
                "coral-test-secret",
                None,
                None,
                "coral-tests",
            ))
            .load()
            .await
    }

    /// Forgets every resource (moto's own reset endpoint).
    pub async fn reset(&self) -> Result<()> {
        reqwest::Client::new()
            .post(format!("{}/moto-api/reset", self.endpoint()))
            .send()
            .await?
            .error_for_status()
            .context("resetting moto")?;
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        self.service.log_tail()
    }
}
