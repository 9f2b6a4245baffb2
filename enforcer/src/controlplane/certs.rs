//! A private CA with a server certificate for the control plane and client certificates for
//! nodes (mTLS), as PEM files: for the demo, the tests and `enforcer certs`. A real
//! deployment may bring its own PKI; nothing else in the crate depends on how the
//! certificates were made.
//!
//! Files written into the directory (keys mode 0600, nothing is ever overwritten):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the CA: nodes pin `ca.pem`; the control plane's `client_ca` for mTLS |
//! | `server.pem`, `server.key` | the control plane's `tls_cert` / `tls_key` |
//! | `client-<name>.pem`, `client-<name>.key` | a node's `client_cert` / `client_key` |
//!
//! Keys are ECDSA P-256. The CA may only sign end-entity certificates (path length 0);
//! certificates are valid from an hour ago (clock skew) for [`CA_VALIDITY_DAYS`] (CA) or
//! [`LEAF_VALIDITY_DAYS`] (server and clients).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// How long the CA certificate is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// How long server and client certificates are valid.
pub const LEAF_VALIDITY_DAYS: i64 = 825;

/// Errors generating certificates.
#[derive(Debug, Error)]
pub enum CertError {
    /// No name to put in the server certificate.
    #[error("the server certificate needs at least one name (DNS name or IP address)")]
    NoServerNames,
    /// A server or client name cannot be used.
    #[error("{name:?}: {message}")]
    Name {
        /// The name given.
        name: String,
        /// What was expected.
        message: String,
    },
    /// rcgen refused the parameters or failed to sign.
    #[error("generating the {what}")]
    Generate {
        /// Which certificate or key.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A file is already there; certificates are never overwritten.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A file or the directory could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A certificate and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key (PKCS#8).
    pub key: PathBuf,
}

/// Everything [`generate`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// The CA.
    pub ca: CertKeyPaths,
    /// The control plane's server certificate.
    pub server: CertKeyPaths,
    /// Client certificates by name.
    pub clients: BTreeMap<String, CertKeyPaths>,
}

/// Generates a CA, a server certificate whose subject alternative names are
/// `server_names` (DNS names, or IP addresses such as `127.0.0.1`), and one client
/// certificate per name in `clients` (a DNS-style name: letters, digits, `.`, `-`, `_`),
/// into `dir` (created if missing).
pub fn generate(
    dir: &Path,
    server_names: &[&str],
    clients: &[&str],
) -> Result<CertPaths, CertError> {
    if server_names.is_empty() {
        return Err(CertError::NoServerNames);
    }
    for name in clients {
        check_client_name(name)?;
    }
    let paths = CertPaths {
        ca: pair(dir, "ca"),
        server: pair(dir, "server"),
        clients: clients
            .iter()
            .map(|name| (name.to_string(), pair(dir, &format!("client-{name}"))))
            .collect(),
    };
    // Check every file first so a refusal leaves nothing half-written behind.
    for p in [&paths.ca, &paths.server]
        .into_iter()
        .chain(paths.clients.values())
    {
        for path in [&p.cert, &p.key] {
            if path.exists() {
                return Err(CertError::Exists { path: path.clone() });
            }
        }
    }
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let generate_err = |what: &str| {
        let what = what.to_owned();
        move |source| CertError::Generate { what, source }
    };

    let ca_key = KeyPair::generate().map_err(generate_err("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "enforcer control plane CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate_err("CA certificate"))?;
    write_file(&paths.ca.cert, 0o644, &ca_cert.pem())?;
    write_file(&paths.ca.key, 0o600, &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>,
                common_name: &str,
                usage: ExtendedKeyUsagePurpose,
                out: &CertKeyPaths| {
        let what = format!("certificate for {common_name:?}");
        let mut params = CertificateParams::new(names).map_err(|source| CertError::Name {
            name: common_name.to_owned(),
            message: format!("not usable as a DNS name or IP address ({source})"),
        })?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(generate_err(&what))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(generate_err(&what))?;
        write_file(&out.cert, 0o644, &cert.pem())?;
        write_file(&out.key, 0o600, &key.serialize_pem())
    };
    leaf(
        server_names.iter().map(|n| n.to_string()).collect(),
        server_names[0],
        ExtendedKeyUsagePurpose::ServerAuth,
        &paths.server,
    )?;
    for (name, out) in &paths.clients {
        leaf(
            vec![name.clone()],
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            out,
        )?;
    }
    Ok(paths)
}

fn pair(dir: &Path, stem: &str) -> CertKeyPaths {
    CertKeyPaths {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// Client names become file names and DNS names, so they are restricted to characters safe
/// in both.
fn check_client_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(CertError::Name {
            name: name.to_owned(),
            message:
                "expected 1 to 63 letters, digits, '.', '-' or '_', not starting with '.' or '-'"
                    .into(),
        })
    }
}

fn write_file(path: &Path, mode: u32, text: &str) -> Result<(), CertError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => CertError::Exists {
                path: path.to_owned(),
            },
            _ => CertError::Write {
                path: path.to_owned(),
                source,
            },
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writes_pem_files_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let paths = generate(
            dir.path(),
            &["localhost", "127.0.0.1"],
            &["node-1", "node-2"],
        )
        .unwrap();
        assert_eq!(paths.server.cert, dir.path().join("server.pem"));
        assert_eq!(
            paths.clients["node-2"].key,
            dir.path().join("client-node-2.key")
        );
        for p in [&paths.ca, &paths.server, &paths.clients["node-1"]] {
            assert!(
                fs::read_to_string(&p.cert)
                    .unwrap()
                    .starts_with("-----BEGIN CERTIFICATE-----")
            );
            assert!(
                fs::read_to_string(&p.key)
                    .unwrap()
                    .starts_with("-----BEGIN PRIVATE KEY-----")
            );
            let mode = fs::metadata(&p.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.key.display());
        }
        let e = generate(dir.path(), &["localhost"], &[]).unwrap_err();
        assert!(matches!(e, CertError::Exists { .. }), "{e}");
    }

    #[test]
    fn bad_names_are_rejected_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            generate(dir.path(), &[], &[]),
            Err(CertError::NoServerNames)
        ));
        let e = generate(dir.path(), &["localhost"], &["../escape"]).unwrap_err();
        assert!(matches!(e, CertError::Name { .. }), "{e}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
