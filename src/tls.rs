//! TLS and mutual TLS for both listeners, with certificates renewed without a restart.
//!
//! The certificate chain, its key and (for mutual TLS) the client CA are read from PEM files
//! and checked as a whole: the key must match the certificate and the certificate must be
//! within its validity period, else the server does not start. The files are watched (every
//! [`POLL_INTERVAL`], and at once on SIGHUP); a changed set that passes the same checks
//! replaces the served one for every new connection, and one that does not (a key copied
//! before its certificate, an expired renewal) is reported and the old one kept.
//!
//! Mutual TLS: a client presenting a certificate that does not chain to the client CA fails
//! the handshake. A client presenting none completes it, and is then answered
//! `401 client_certificate_required` (gRPC: UNAUTHENTICATED) on every route except the health
//! probes, because orchestrators probe over HTTPS without client certificates (Kubernetes'
//! `httpGet` cannot present one); [`anonymous_may_call`] is that list.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::connections::Protocol;

/// How often the certificate files are looked at for a renewal.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Where the served certificate comes from (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.client_ca.as_deref())
    }
}

/// One checked set of files, as rustls configurations for each protocol's ALPN.
struct Loaded {
    rest: Arc<rustls::ServerConfig>,
    grpc: Arc<rustls::ServerConfig>,
    stamp: Vec<FileStamp>,
    not_after: i64,
}

/// The TLS state both listeners share: the configuration new connections get, swapped on renewal.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
}

impl Tls {
    /// Reads and checks the files; an error says which file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, String> {
        let loaded = load(&files, SystemTime::now())?;
        record_expiry(loaded.not_after);
        Ok(Arc::new(Tls { files, current: RwLock::new(Arc::new(loaded)) }))
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_certificate(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for a new connection, with the configuration in force now.
    pub fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let loaded = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        TlsAcceptor::from(match protocol {
            Protocol::Http1 => Arc::clone(&loaded.rest),
            Protocol::Http2 => Arc::clone(&loaded.grpc),
        })
    }

    /// The certificate's end of validity, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.current.read().unwrap_or_else(|e| e.into_inner()).not_after
    }

    /// Watches the files until the process ends: reloads on change and on SIGHUP.
    pub fn spawn_renewal_watch(self: &Arc<Self>) {
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            // The stamp of the last set tried, so a broken set is reported once, not every poll.
            let mut last_tried = tls.current.read().unwrap_or_else(|e| e.into_inner()).stamp.clone();
            loop {
                let asked = tokio::select! {
                    _ = tokio::time::sleep(POLL_INTERVAL) => false,
                    Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let stamp = stamps(&tls.files);
                if !asked && stamp == last_tried {
                    continue;
                }
                last_tried = stamp;
                tls.reload(if asked { "SIGHUP" } else { "files changed" });
            }
        });
    }

    fn reload(&self, why: &str) {
        match load(&self.files, SystemTime::now()) {
            Ok(loaded) => {
                let not_after = loaded.not_after;
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
                record_expiry(not_after);
                metrics::counter!(crate::metrics::TLS_RELOADS, "outcome" => "loaded").increment(1);
                tracing::info!(reason = why, valid_until = %format_time(not_after), "TLS certificate reloaded; new connections get it");
            }
            Err(error) => {
                metrics::counter!(crate::metrics::TLS_RELOADS, "outcome" => "refused").increment(1);
                tracing::error!(reason = why, %error, "TLS files changed but cannot be served; the previous certificate stays");
            }
        }
    }
}

/// Size and modification time of a file (None when it cannot be read now).
type FileStamp = Option<(u64, SystemTime)>;

fn stamps(files: &TlsFiles) -> Vec<FileStamp> {
    files.paths().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?)))).collect()
}

/// ring, not aws-lc-rs: it builds with the C compiler the project already needs. rustls marks
/// it deprecated because ring lacks the post-quantum key exchange (X25519MLKEM768); key
/// exchange here is the classical X25519 / P-256.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(files: &TlsFiles, now: SystemTime) -> Result<Loaded, String> {
    let stamp = stamps(files);
    let cert_name = files.cert.display();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("--tls-cert {cert_name}: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("--tls-cert {cert_name} holds no PEM certificate"));
    };
    let (not_before, not_after) = validity(leaf).map_err(|e| format!("--tls-cert {cert_name}: {e}"))?;
    check_validity(not_before, not_after, unix_seconds(now)).map_err(|e| format!("--tls-cert {cert_name}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    let provider = provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("--tls-key {} does not go with --tls-cert {cert_name}: {e}", files.key.display()))?;
    let certified = Arc::new(certified);
    let verifier = match &files.client_ca {
        None => None,
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect())
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("--tls-client-ca {} holds no usable CA certificate", ca.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            Some(verifier)
        }
    };
    let config_for = |alpn: &[u8]| -> Result<Arc<rustls::ServerConfig>, String> {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &verifier {
            None => builder.with_no_client_auth(),
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
        };
        let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::clone(&certified))));
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    // REST is HTTP/1.1 only; gRPC clients insist on `h2` by ALPN.
    Ok(Loaded { rest: config_for(b"http/1.1")?, grpc: config_for(b"h2")?, stamp, not_after })
}

/// The certificate's validity period, in Unix seconds.
fn validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = parsed.validity();
    Ok((validity.not_before.timestamp(), validity.not_after.timestamp()))
}

/// A certificate no client would accept is refused rather than served: outside its validity
/// period every verifying client fails, and the cause is far easier to read here.
fn check_validity(not_before: i64, not_after: i64, now: i64) -> Result<(), String> {
    if now > not_after {
        return Err(format!("the certificate expired on {}", format_time(not_after)));
    }
    if now < not_before {
        return Err(format!("the certificate is not valid before {}", format_time(not_before)));
    }
    Ok(())
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn format_time(unix: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(unix).map_or_else(|_| unix.to_string(), |t| t.to_string())
}

fn record_expiry(not_after: i64) {
    metrics::gauge!(crate::metrics::TLS_CERTIFICATE_EXPIRY).set(not_after as f64);
    let days = (not_after - unix_seconds(SystemTime::now())) as f64 / 86_400.0;
    if days < 14.0 {
        tracing::warn!(days_left = format!("{days:.1}"), "the TLS certificate expires soon; renew it (the server re-reads it on change)");
    }
}

/// The calls a client without a certificate may still make under mutual TLS: liveness and
/// readiness probes, which carry no data.
pub fn anonymous_may_call(protocol: Protocol, path: &str) -> bool {
    match protocol {
        Protocol::Http1 => matches!(path, "/health/live" | "/health/ready" | "/v2/health/live" | "/v2/health/ready" | "/ping"),
        Protocol::Http2 => matches!(
            path,
            "/grpc.health.v1.Health/Check"
                | "/grpc.health.v1.Health/Watch"
                | "/inference.GRPCInferenceService/ServerLive"
                | "/inference.GRPCInferenceService/ServerReady"
        ),
    }
}

/// How much of a refused request's body is read before the 401, so that clients uploading a
/// photo read the answer rather than a reset connection. Larger uploads are cut.
pub const REFUSED_BODY_READ_BYTES: usize = 8 << 20;

/// The answer to any other call from a client without a certificate.
pub fn client_certificate_required(protocol: Protocol) -> axum::response::Response {
    use axum::response::IntoResponse;
    const MESSAGE: &str = "this server requires a client certificate (mutual TLS); connect with one issued by its client CA";
    match protocol {
        Protocol::Http1 => (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": {"code": "client_certificate_required", "message": MESSAGE}})),
        )
            .into_response(),
        Protocol::Http2 => tonic::Status::unauthenticated(MESSAGE).into_http::<axum::body::Body>(),
    }
}

/// `GET /health/ready` over TLS, for `--check-ready`: the status line only. The server's
/// certificate is not verified — the probe runs beside the server, on its own address, sends
/// nothing secret and reads nothing but the status — so a certificate issued for a public
/// name still answers a probe on 127.0.0.1.
pub fn probe_over_tls(stream: std::net::TcpStream, request: &[u8]) -> std::io::Result<[u8; 12]> {
    use std::io::{Read, Write};
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(probe::AnyServerCertificate(provider())))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let connection = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    tls.write_all(request)?;
    let mut head = [0u8; 12];
    tls.read_exact(&mut head)?;
    Ok(head)
}

mod probe {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts the server's certificate without checking it; signatures are still verified.
    #[derive(Debug)]
    pub struct AnyServerCertificate(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyServerCertificate {
        fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_checked_at_both_ends() {
        assert!(check_validity(100, 200, 150).is_ok());
        assert!(check_validity(100, 200, 100).is_ok());
        assert!(check_validity(100, 200, 200).is_ok());
        let expired = check_validity(100, 200, 201).unwrap_err();
        assert!(expired.contains("expired on"), "{expired}");
        let early = check_validity(100, 200, 99).unwrap_err();
        assert!(early.contains("not valid before"), "{early}");
    }

    #[test]
    fn only_the_probes_are_open_without_a_client_certificate() {
        for path in ["/health/live", "/health/ready", "/v2/health/ready", "/v2/health/live", "/ping"] {
            assert!(anonymous_may_call(Protocol::Http1, path), "{path}");
        }
        for path in ["/v1/models", "/v2/models/x/infer", "/metrics", "/health/ready/../../v1/models", "/"] {
            assert!(!anonymous_may_call(Protocol::Http1, path), "{path}");
        }
        assert!(anonymous_may_call(Protocol::Http2, "/grpc.health.v1.Health/Check"));
        assert!(!anonymous_may_call(Protocol::Http2, "/inference.GRPCInferenceService/ModelInfer"));
        assert!(!anonymous_may_call(Protocol::Http2, "/health/ready"));
    }

    #[test]
    fn missing_files_name_the_flag() {
        let files = TlsFiles { cert: "/nonexistent/cert.pem".into(), key: "/nonexistent/key.pem".into(), client_ca: None };
        let error = load(&files, SystemTime::now()).err().expect("missing files refused");
        assert!(error.starts_with("--tls-cert /nonexistent/cert.pem"), "{error}");
    }

    #[test]
    fn formatted_times_are_dates() {
        assert_eq!(format_time(0), "Jan  1 00:00:00 1970 +00:00");
    }
}
