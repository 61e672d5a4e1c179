//! Smoke tests of an idle color, sent through the router's preview route like real traffic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bluegreen_router::Color;
use bytes::Bytes;
use http::{HeaderName, Request, header};
use http_body_util::Full;
use serde::Serialize;

use super::hooks;
use super::release::Release;
use super::{CommandError, Controller, EventKind};
use crate::config::controller::Check;
use crate::store::EnvironmentStatus;
use crate::transport::{TlsClient, http_request};

/// The outcome of one check.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub latency_ms: f64,
}

/// How to reach a color through the router: the listen address and the preview header.
pub struct PreviewRoute {
    pub router: SocketAddr,
    pub header: HeaderName,
    pub secret: Option<(HeaderName, String)>,
    /// With `router.tls`: a client that trusts exactly the router's own certificate.
    pub tls: Option<TlsClient>,
}

/// Runs each check once through the preview route and reports every result.
pub async fn run(
    route: &PreviewRoute,
    color: Color,
    version: Option<&str>,
    checks: &[Check],
    timeout: Duration,
) -> Vec<CheckResult> {
    let mut results = Vec::with_capacity(checks.len());
    for check in checks {
        let name = format!("{} {}", check.method, check.path);
        let mut request = Request::builder()
            .method(check.method.clone())
            .uri(&check.path)
            .header(header::HOST, route.router.to_string())
            .header(&route.header, color.as_str());
        if let Some((name, secret)) = &route.secret {
            request = request.header(name, secret);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .expect("checked method and path");
        let started = Instant::now();
        let answer = http_request(route.router, route.tls.as_ref(), request, timeout).await;
        let latency = started.elapsed();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        let failure = match &answer {
            Err(e) => Some(e.clone()),
            Ok((status, headers, body)) => {
                let expected_body = check
                    .body_contains
                    .as_ref()
                    .map(|text| text.replace("{version}", version.unwrap_or("")));
                let served_by = headers
                    .get("x-bluegreen-preview")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.starts_with("refused"));
                if let Some(refused) = served_by {
                    Some(format!("the router refused the preview: {refused}"))
                } else if status.as_u16() != check.status {
                    Some(format!(
                        "status {} (expected {})",
                        status.as_u16(),
                        check.status
                    ))
                } else if let Some(text) = expected_body
                    && !String::from_utf8_lossy(body).contains(&text)
                {
                    Some(format!("body does not contain {text:?}"))
                } else if let Some(max) = check.max_latency
                    && latency > max
                {
                    Some(format!(
                        "took {latency_ms:.1}ms (max {}ms)",
                        max.as_millis()
                    ))
                } else {
                    None
                }
            }
        };
        results.push(CheckResult {
            name,
            passed: failure.is_none(),
            detail: failure.unwrap_or_else(|| format!("ok in {latency_ms:.1}ms")),
            latency_ms,
        });
    }
    results
}

impl Controller {
    /// The smoke tests of `color` that failed, each as "name: detail" (empty: all passed).
    pub(crate) async fn failed_tests(
        &self,
        color: Color,
        release: Option<&Release>,
    ) -> Result<Vec<String>, CommandError> {
        let results = self.test_environment(color, release).await?;
        Ok(results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{}: {}", r.name, r.detail))
            .collect())
    }

    /// Runs the configured smoke tests against `color` through the preview route.
    pub async fn test_environment(
        &self,
        color: Color,
        release: Option<&Release>,
    ) -> Result<Vec<CheckResult>, CommandError> {
        let config = self.config();
        let test = &config.controller.test;
        let Some(preview) = &config.router.preview else {
            return Err(CommandError::Refused(
                "router.preview is disabled; tests reach the idle color through it. Enable router.preview".into(),
            ));
        };
        let tls = match &config.router.tls {
            Some(files) => Some(
                own_certificate_client(&files.cert)
                    .map_err(|e| CommandError::Failed(format!("router.tls.cert: {e}")))?,
            ),
            None => None,
        };
        if self.plane.healthy_count(color) == 0 {
            let record = self.environment(color);
            return Err(CommandError::Refused(match record.status {
                EnvironmentStatus::Stopped => format!(
                    "{color} is not deployed; run `bluegreen deploy --environment {color} --version V` first"
                ),
                _ => format!("{color} has no healthy upstream; see `bluegreen status`"),
            }));
        }
        let route = PreviewRoute {
            router: self.plane.preview().router,
            header: preview.header.clone(),
            secret: preview
                .secret
                .as_ref()
                .map(|s| (preview.secret_header.clone(), s.clone())),
            tls,
        };
        let version = self.instances_record(color).version;
        let mut results = run(
            &route,
            color,
            version.as_deref(),
            &test.checks,
            test.timeout,
        )
        .await;
        if let Some(argv) = &test.command {
            let facts = self.facts(color, release);
            let started = Instant::now();
            let outcome = hooks::run(
                "test",
                argv,
                &facts,
                &[],
                test.timeout,
                &self.logs_dir.join("tests.log"),
            )
            .await;
            results.push(CheckResult {
                name: argv.join(" "),
                passed: outcome.is_ok(),
                detail: match outcome {
                    Ok(_) => "exited 0".into(),
                    Err(e) => e,
                },
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
        }
        if results.is_empty() {
            results.push(CheckResult {
                name: "health".into(),
                passed: true,
                detail:
                    "no test.checks or test.command configured; only health checks vouch for it"
                        .into(),
                latency_ms: 0.0,
            });
        }
        let failed = results.iter().filter(|r| !r.passed).count();
        let message = format!(
            "{}tests of {color}: {} passed, {failed} failed{}",
            self.on_this_host(color),
            results.len() - failed,
            results
                .iter()
                .filter(|r| !r.passed)
                .map(|r| format!("; {}: {}", r.name, r.detail))
                .collect::<String>()
        );
        self.event(EventKind::Test, &message, release.map(|r| r.id))
            .await;
        Ok(results)
    }
}

/// A TLS client for talking to our own router: it accepts exactly the certificate in
/// `router.tls.cert` (whatever names it carries), and nothing else.
fn own_certificate_client(cert: &std::path::Path) -> Result<TlsClient, String> {
    use std::sync::Arc;
    let file =
        std::fs::File::open(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let leaf = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .next()
        .ok_or_else(|| format!("{} holds no PEM certificate", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(OwnCertificate {
        leaf: leaf.to_vec(),
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
    Ok((Arc::new(config), name))
}

/// Certificate pinning to the router's own leaf certificate; signatures are still checked.
#[derive(Debug)]
struct OwnCertificate {
    leaf: Vec<u8>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for OwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the certificate is not router.tls.cert: this is not our router".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn only_the_routers_own_certificate_is_accepted() {
        let ours = rcgen::generate_simple_self_signed(vec!["shop.example".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["shop.example".into()]).unwrap();
        let verifier = OwnCertificate {
            leaf: ours.cert.der().to_vec(),
            provider: std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(
            verifier
                .verify_server_cert(ours.cert.der(), &[], &name, &[], now)
                .is_ok()
        );
        let refused = verifier
            .verify_server_cert(other.cert.der(), &[], &name, &[], now)
            .unwrap_err();
        assert!(refused.to_string().contains("not our router"), "{refused}");
    }
}
