//! The node's inspection CA: generated once into the daemon's state directory and reused
//! across restarts, so the trust an agent sandbox is given stays valid. Leaf certificates
//! are minted per server name when an agent first connects to it, and cached.
//!
//! | file (in `[inspect].ca_dir`, default `state_dir`) | what |
//! |---|---|
//! | `inspect-ca.pem` | the CA certificate agents trust (`enforcer inspect ca` prints it) |
//! | `inspect-ca.key` | its ECDSA P-256 key, mode 0600 |
//!
//! The key is never overwritten: a certificate without its key (or the reverse) is an
//! error naming the file, not a reason to mint a new CA that every sandbox would have to
//! trust again.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate in the state directory.
pub const CA_CERT_FILE: &str = "inspect-ca.pem";
/// File name of the CA key in the state directory.
pub const CA_KEY_FILE: &str = "inspect-ca.key";
/// Common name of the CA: also what rebuilds its issuer name after a restart.
const CA_COMMON_NAME: &str = "enforcer inspecting proxy CA";
/// How long the CA is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a minted leaf is valid; it is re-minted well before that.
const LEAF_VALIDITY_DAYS: i64 = 30;
/// Age at which a cached leaf is replaced by a fresh one.
const LEAF_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Leaves kept; the oldest is dropped beyond this (a name seen again is minted again).
pub const LEAF_CACHE: usize = 1024;

/// Errors loading, creating or using the CA.
#[derive(Debug, Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Only one of the certificate and the key exists.
    #[error(
        "{} exists but {} does not; restore it or remove both to generate a new CA (agents must then trust the new one)",
        present.display(), missing.display()
    )]
    Incomplete {
        /// The file that is there.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A file is not what it should be.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rcgen failed to generate or sign.
    #[error("generating the {what}")]
    Generate {
        /// Which certificate or key.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the key.
    #[error("loading the key of the certificate for {name:?}")]
    Key {
        /// The server name.
        name: String,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
}

/// The CA and its cache of minted leaves.
pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    leaves: Mutex<Leaves>,
}

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCa").finish_non_exhaustive()
    }
}

/// Minted leaves by server name, oldest first for eviction.
#[derive(Default)]
struct Leaves {
    by_name: HashMap<String, (Arc<CertifiedKey>, Instant)>,
    order: VecDeque<String>,
}

/// The CA's parameters. The same every time, so the issuer name in leaves minted after a
/// restart matches the subject of the stored certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    // Path length 0: the CA signs leaves only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl NodeCa {
    /// The paths of the CA certificate and key in `state_dir`.
    pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
        (state_dir.join(CA_CERT_FILE), state_dir.join(CA_KEY_FILE))
    }

    /// Loads the CA from `state_dir`, generating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<NodeCa, CaError> {
        let (cert_path, key_path) = Self::paths(state_dir);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(&cert_path, &key_path),
            (true, false) => Err(CaError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<NodeCa, CaError> {
        let generate = |what: &str| {
            let what = what.to_string();
            move |source| CaError::Generate { what, source }
        };
        let key = KeyPair::generate().map_err(generate("CA key"))?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(generate("CA certificate"))?;
        // The key first: a crash in between leaves a key without a certificate, which
        // load_or_create reports rather than silently replacing.
        write_new(key_path, 0o600, &key.serialize_pem())?;
        write_new(cert_path, 0o644, &cert.pem())?;
        tracing::info!(cert = %cert_path.display(), "generated the inspection CA");
        Ok(NodeCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(ca_params(), key),
            leaves: Mutex::default(),
        })
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<NodeCa, CaError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| CaError::Io {
                op: "reading",
                path: path.to_path_buf(),
                source,
            })
        };
        let invalid = |path: &Path, message: String| CaError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let key_pem = read(key_path)?;
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(key_path, format!("not a PEM private key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("not a PEM certificate: {e}")))?;
        // Without an X.509 parser, check the pairing by finding the key's
        // SubjectPublicKeyInfo in the certificate: leaves signed by a key the agents do not
        // trust would fail every handshake with a confusing error much later.
        let spki = key.subject_public_key_info();
        if !cert_der.windows(spki.len()).any(|w| w == spki.as_slice()) {
            return Err(invalid(
                cert_path,
                format!(
                    "the certificate does not belong to the key in {}",
                    key_path.display()
                ),
            ));
        }
        Ok(NodeCa {
            issuer: Issuer::new(ca_params(), key),
            cert_pem,
            cert_der,
            leaves: Mutex::default(),
        })
    }

    /// The CA certificate, PEM: what agent sandboxes trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `name` (a normalized host name) signed by this CA, with the CA
    /// certificate after it in the chain; minted on first use and cached.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut leaves = self.leaves.lock().expect("leaf cache lock");
        if let Some((leaf, minted)) = leaves.by_name.get(name)
            && minted.elapsed() < LEAF_MAX_AGE
        {
            return Ok(leaf.clone());
        }
        let leaf = Arc::new(self.mint(name)?);
        if leaves
            .by_name
            .insert(name.to_string(), (leaf.clone(), Instant::now()))
            .is_none()
        {
            leaves.order.push_back(name.to_string());
        }
        while leaves.order.len() > LEAF_CACHE {
            if let Some(oldest) = leaves.order.pop_front() {
                leaves.by_name.remove(&oldest);
            }
        }
        Ok(leaf)
    }

    /// Leaves in the cache now.
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().expect("leaf cache lock").by_name.len()
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let generate = |source| CaError::Generate {
            what: format!("certificate for {name:?}"),
            source,
        };
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(generate)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|source| {
            CaError::Key {
                name: name.to_string(),
                source,
            }
        })?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing,
        ))
    }
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), CaError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| CaError::Io {
            op: "writing",
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls::{
        RootCertStore,
        client::WebPkiServerVerifier,
        pki_types::{ServerName, UnixTime},
    };

    use super::*;

    /// Verifies `leaf` for `name` with `ca` as the only root, as an agent would.
    fn verify(ca: &NodeCa, leaf: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &leaf.cert[0],
            &leaf.cert[1..],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn created_once_reused_after_restart_and_leaves_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::load_or_create(dir.path()).unwrap();
        let (cert, key) = NodeCa::paths(dir.path());
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = fs::read_to_string(&cert).unwrap();
        assert_eq!(ca.cert_pem(), pem);

        let leaf = ca.leaf("api.example.test").unwrap();
        verify(&ca, &leaf, "api.example.test").unwrap();
        assert!(verify(&ca, &leaf, "other.example.test").is_err());
        assert!(Arc::ptr_eq(&leaf, &ca.leaf("api.example.test").unwrap()));

        // A restarted daemon loads the same CA, and its new leaves chain to the stored
        // certificate (the one agents trust).
        drop(ca);
        let again = NodeCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), pem);
        let leaf = again.leaf("api.example.test").unwrap();
        verify(&again, &leaf, "api.example.test").unwrap();
    }

    #[test]
    fn cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NodeCa::load_or_create(dir.path()).unwrap();
        for i in 0..LEAF_CACHE + 3 {
            ca.leaf(&format!("h{i}.example.test")).unwrap();
        }
        assert_eq!(ca.cached_leaves(), LEAF_CACHE);
    }

    #[test]
    fn half_a_ca_or_a_foreign_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        NodeCa::load_or_create(dir.path()).unwrap();
        let key = NodeCa::paths(dir.path()).1;
        fs::remove_file(&key).unwrap();
        let err = NodeCa::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");

        let other = tempfile::tempdir().unwrap();
        NodeCa::load_or_create(other.path()).unwrap();
        fs::copy(NodeCa::paths(other.path()).1, &key).unwrap();
        let err = NodeCa::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
