//! gRPC over TLS: a CA and a server certificate for 127.0.0.1 made here with rcgen, the
//! coordinator serving with `--tls-cert/--tls-key`, and clients with and without the CA.

mod common;

use common::*;
use medtvt_coordinator::tls::TlsFiles;
use medtvt_coordinator::{Coordinator, ServerOptions};
use medtvt_proto::client::{self, ClientError, ConnectOptions};
use medtvt_proto::v1 as pb;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

/// Writes ca.pem, cert.pem and key.pem (server certificate for 127.0.0.1 signed by the CA).
fn write_certificates(dir: &Path) -> (PathBuf, TlsFiles) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (dir.join("ca.pem"), files)
}

fn connect_options(ca: Option<PathBuf>) -> ConnectOptions {
    ConnectOptions { attempts: 1, connect_timeout: Duration::from_secs(5), ca_cert: ca, ..ConnectOptions::default() }
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_still_checks_the_token() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, files) = write_certificates(certs.path());
    let server =
        TestServer::start(ServerOptions { tls: Some(files), auth_token: Some("s3cret".into()), ..options() }).await;
    let https = format!("https://{}", server.addr);

    let mut trusted = client::connect_with(&https, Some("s3cret"), &connect_options(Some(ca.clone()))).await.unwrap();
    let job = submit(&mut trusted, server.config("pt", ""), &[]).await;
    assert_eq!(job_status(&mut trusted, job).await.state, pb::JobState::Running as i32);

    // The token is still required over TLS.
    let mut anonymous = client::connect_with(&https, None, &connect_options(Some(ca.clone()))).await.unwrap();
    let err = anonymous.get_status(pb::StatusRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A plaintext client gets no answer from a TLS server.
    let plain = client::connect_with(&server.url, Some("s3cret"), &connect_options(None)).await;
    match plain {
        Err(ClientError::Connect { .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(mut c) => {
            let err = c.get_status(pb::StatusRequest::default()).await.unwrap_err();
            assert_ne!(err.code(), Code::Ok);
        }
    }

    // A client that trusts another CA refuses the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _) = write_certificates(other.path());
    let untrusted = client::connect_with(&https, Some("s3cret"), &connect_options(Some(other_ca))).await;
    match untrusted {
        Err(ClientError::Connect { .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(mut c) => assert!(
            c.get_status(pb::StatusRequest::default()).await.is_err(),
            "a certificate from an unknown CA was accepted"
        ),
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_certificate_or_key_files_stop_the_start_naming_the_file() {
    let certs = tempfile::tempdir().unwrap();
    let (_, files) = write_certificates(certs.path());
    let addr = "127.0.0.1:0".parse().unwrap();

    let missing = TlsFiles { key: certs.path().join("missing-key.pem"), ..files.clone() };
    let err =
        Coordinator::bind(addr, ServerOptions { tls: Some(missing), ..options() }).await.err().unwrap().to_string();
    assert!(err.contains("missing-key.pem"), "{err}");

    // A certificate where the key should be.
    let swapped = TlsFiles { cert: files.cert.clone(), key: files.cert.clone() };
    let err =
        Coordinator::bind(addr, ServerOptions { tls: Some(swapped), ..options() }).await.err().unwrap().to_string();
    assert!(err.contains("cert.pem") && err.contains("PRIVATE KEY"), "{err}");

    // Another certificate's key: a valid PEM, but not a pair with the certificate.
    let other = tempfile::tempdir().unwrap();
    let (_, other_files) = write_certificates(other.path());
    let mismatched = TlsFiles { cert: files.cert.clone(), key: other_files.key.clone() };
    let err =
        Coordinator::bind(addr, ServerOptions { tls: Some(mismatched), ..options() }).await.err().unwrap().to_string();
    assert!(err.contains("cert.pem") && err.contains("key.pem") && err.contains("not a usable pair"), "{err}");

    let err = client::connect_with("https://127.0.0.1:1", None, &connect_options(Some(certs.path().join("no-ca.pem"))))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no-ca.pem"), "{err}");
}
