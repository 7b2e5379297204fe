//! The cluster's certificates: one CA per cluster, one certificate per node
//! (named for the node, valid for its addresses), all made with rcgen.
//! `tandem certs` writes them to a directory; `tandem serve` makes throwaway
//! ones in memory.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Result, WireError};

fn cert_err(e: impl std::fmt::Display) -> WireError {
    WireError::Cert(e.to_string())
}

/// What a node presents and trusts: its certificate and key, and the cluster CA.
#[derive(Debug)]
pub struct NodeIdentity {
    pub node: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            node: self.node.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

/// A node's certificate and key in PEM.
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub node: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct ClusterCa {
    cluster: String,
    key: KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl ClusterCa {
    fn params(cluster: &str) -> Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        p.distinguished_name
            .push(DnType::CommonName, format!("Tandem cluster CA: {cluster}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(p)
    }

    /// A new CA for `cluster`.
    pub fn generate(cluster: &str) -> Result<ClusterCa> {
        Self::from_key(cluster, KeyPair::generate().map_err(cert_err)?)
    }

    /// The CA of `cluster` from its saved key (to issue more node certificates).
    pub fn from_key_pem(cluster: &str, key_pem: &str) -> Result<ClusterCa> {
        Self::from_key(cluster, KeyPair::from_pem(key_pem).map_err(cert_err)?)
    }

    fn from_key(cluster: &str, key: KeyPair) -> Result<ClusterCa> {
        let cert = Self::params(cluster)?.self_signed(&key).map_err(cert_err)?;
        Ok(ClusterCa {
            cluster: cluster.to_string(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `node`, valid for its name, `localhost` and `ips`,
    /// usable both to serve and to connect.
    pub fn issue(&self, node: &str, ips: &[IpAddr]) -> Result<NodeCert> {
        let mut p = CertificateParams::new(vec![node.to_string(), "localhost".to_string()])
            .map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, node);
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(cert_err)?;
        let issuer = Issuer::new(Self::params(&self.cluster)?, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(cert_err)?;
        Ok(NodeCert {
            node: node.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// An in-memory identity for `node` (throwaway clusters and tests).
    pub fn identity(&self, node: &str, ips: &[IpAddr]) -> Result<NodeIdentity> {
        let c = self.issue(node, ips)?;
        identity_from_pem(node, &c.cert_pem, &c.key_pem, &self.cert_pem)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

/// Builds an identity from PEM text.
pub fn identity_from_pem(
    node: &str,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<NodeIdentity> {
    let first_cert = |pem: &str, what: &str| -> Result<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .ok_or_else(|| WireError::Cert(format!("no certificate in the {what} PEM")))?
            .map_err(|e| WireError::Cert(format!("{what}: {e}")))
    };
    let key = rustls_pemfile::pkcs8_private_keys(&mut key_pem.as_bytes())
        .next()
        .ok_or_else(|| WireError::Cert(format!("no PKCS#8 private key for {node}")))?
        .map_err(|e| WireError::Cert(format!("key of {node}: {e}")))?;
    Ok(NodeIdentity {
        node: node.to_string(),
        cert: first_cert(cert_pem, &format!("{node} certificate"))?,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec())),
        ca: first_cert(ca_pem, "CA")?,
    })
}

/// File names inside a certificate directory.
pub fn ca_cert_file(dir: &Path) -> std::path::PathBuf {
    dir.join("ca.pem")
}
pub fn ca_key_file(dir: &Path) -> std::path::PathBuf {
    dir.join("ca.key")
}
pub fn node_files(dir: &Path, node: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
    )
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    std::fs::write(path, text).map_err(|err| WireError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|err| {
            WireError::Io {
                path: path.to_path_buf(),
                err,
            }
        })?;
    }
    let _ = private;
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|err| WireError::Io {
        path: path.to_path_buf(),
        err,
    })
}

/// Writes a CA (unless `dir` already has one, which is then reused) and a
/// certificate for every `(node, addresses)`.
pub fn write_cluster_certs(
    dir: &Path,
    cluster: &str,
    nodes: &[(String, Vec<IpAddr>)],
) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|err| WireError::Io {
        path: dir.to_path_buf(),
        err,
    })?;
    let ca = if ca_key_file(dir).is_file() {
        ClusterCa::from_key_pem(cluster, &read(&ca_key_file(dir))?)?
    } else {
        let ca = ClusterCa::generate(cluster)?;
        write(&ca_cert_file(dir), ca.cert_pem(), false)?;
        write(&ca_key_file(dir), &ca.key_pem(), true)?;
        ca
    };
    let mut written = vec![ca_cert_file(dir)];
    for (node, ips) in nodes {
        let c = ca.issue(node, ips)?;
        let (cert, key) = node_files(dir, node);
        write(&cert, &c.cert_pem, false)?;
        write(&key, &c.key_pem, true)?;
        written.push(cert);
    }
    Ok(written)
}

/// Loads `node`'s identity from a directory `write_cluster_certs` made.
pub fn load_identity(dir: &Path, node: &str) -> Result<NodeIdentity> {
    let (cert, key) = node_files(dir, node);
    identity_from_pem(
        node,
        &read(&cert)?,
        &read(&key)?,
        &read(&ca_cert_file(dir))?,
    )
}
