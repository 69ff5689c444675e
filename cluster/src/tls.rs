//! A self-signed development certificate for `localhost`/`127.0.0.1`, so routers can
//! serve https/wss locally and clients can trust exactly that certificate.

use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DevCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
}

impl DevCert {
    /// Generates a certificate and key into `dir` (`dev-cert.pem`, `dev-key.pem`).
    pub fn generate(dir: &Path) -> Result<DevCert> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])?;
        let cert_pem = ck.cert.pem();
        let cert_path = dir.join("dev-cert.pem");
        let key_path = dir.join("dev-key.pem");
        std::fs::write(&cert_path, &cert_pem)?;
        std::fs::write(&key_path, ck.signing_key.serialize_pem())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(DevCert {
            cert_path,
            key_path,
            cert_pem,
        })
    }

    /// Loads an existing certificate (for clients of `cluster up --tls`).
    pub fn load(cert_path: &Path) -> Result<DevCert> {
        Ok(DevCert {
            cert_path: cert_path.to_path_buf(),
            key_path: PathBuf::new(),
            cert_pem: std::fs::read_to_string(cert_path)?,
        })
    }

    /// A rustls client configuration trusting only this certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&self.cert_pem)? {
            roots.add(cert)?;
        }
        Ok(rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

fn rustls_pemfile_certs(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    Ok(
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?,
    )
}
