//! The cluster's certificates: one CA per cluster, one certificate per node
//! (named for the node, valid for its addresses), all made with rcgen.
//! `tandem certs` writes them to a directory; `tandem serve` makes throwaway
//! ones in memory.
//!
//! A certificate says who its node is: besides the DNS names TLS checks, it
//! carries the URI `urn:tandem:ROLE:NODE` (role: gateway, decode, prefill or
//! client). Every link checks that the peer's handshake claims exactly that
//! name and role ([`claim_of`]), so holding a cluster certificate lets a
//! node be only itself.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls_pki_types::pem::PemObject;

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

    /// A certificate for `node` in `role` (a [`role_kind`]), valid for its
    /// name, `localhost` and `ips`, usable both to serve and to connect.
    pub fn issue(&self, node: &str, role: &str, ips: &[IpAddr]) -> Result<NodeCert> {
        if !valid_name(node) || !ROLES.contains(&role) {
            return Err(WireError::Cert(format!(
                "cannot issue a certificate for {node:?} as {role:?}: names are letters, digits, '.', '_' and '-'; roles {ROLES:?}"
            )));
        }
        let mut p = CertificateParams::new(vec![node.to_string(), "localhost".to_string()])
            .map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, node);
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let uri = format!("{URN}{role}:{node}");
        p.subject_alt_names
            .push(SanType::URI(uri.as_str().try_into().map_err(cert_err)?));
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

    /// An in-memory identity for `node` in `role` (throwaway clusters and tests).
    pub fn identity(&self, node: &str, role: &str, ips: &[IpAddr]) -> Result<NodeIdentity> {
        let c = self.issue(node, role, ips)?;
        identity_from_pem(node, &c.cert_pem, &c.key_pem, &self.cert_pem)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

/// The URI prefix of a node's identity in its certificate.
const URN: &str = "urn:tandem:";
/// The roles a certificate can name.
pub const ROLES: [&str; 4] = ["gateway", "decode", "prefill", "client"];

/// Node names: what a certificate and a URI can carry unescaped.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The role a [`crate::messages::Role`] is, as certificates name it.
pub fn role_kind(role: &crate::messages::Role) -> &'static str {
    use crate::messages::Role;
    match role {
        Role::Gateway => "gateway",
        Role::Decode { .. } => "decode",
        Role::Prefill { .. } => "prefill",
        Role::Client => "client",
    }
}

/// The (role, node) a certificate (DER) says it is.
pub fn claim_of(cert: &[u8]) -> Result<(String, String)> {
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| WireError::Cert(format!("cannot read the peer's certificate: {e}")))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| WireError::Cert(format!("the peer's certificate: {e}")))?
        .ok_or_else(|| WireError::Cert("the peer's certificate names no node".into()))?;
    let mut found = None;
    for n in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(u) = n {
            if let Some(rest) = u.strip_prefix(URN) {
                if found.is_some() {
                    return Err(WireError::Cert(
                        "the peer's certificate names two nodes".into(),
                    ));
                }
                let (role, node) = rest
                    .split_once(':')
                    .ok_or_else(|| WireError::Cert(format!("malformed identity {u:?}")))?;
                found = Some((role.to_string(), node.to_string()));
            }
        }
    }
    found.ok_or_else(|| WireError::Cert("the peer's certificate names no node".into()))
}

/// Builds an identity from PEM text; the certificate must name `node`.
pub fn identity_from_pem(
    node: &str,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<NodeIdentity> {
    let first_cert = |pem: &str, what: &str| -> Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| WireError::Cert(format!("no certificate in the {what} PEM: {e}")))
    };
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WireError::Cert(format!("no PKCS#8 private key for {node}: {e}")))?;
    let cert = first_cert(cert_pem, &format!("{node} certificate"))?;
    let (_, named) = claim_of(&cert)?;
    if named != node {
        return Err(WireError::Cert(format!(
            "the certificate for {node} names {named:?}: make certificates again with `tandem certs`"
        )));
    }
    Ok(NodeIdentity {
        node: node.to_string(),
        cert,
        key: PrivateKeyDer::Pkcs8(key),
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
/// certificate for every `(node, role, addresses)`.
pub fn write_cluster_certs(
    dir: &Path,
    cluster: &str,
    nodes: &[(String, &str, Vec<IpAddr>)],
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
    for (node, role, ips) in nodes {
        let c = ca.issue(node, role, ips)?;
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
