//! Signed policy bundles: the Ed25519 signature the control plane puts on every policy it
//! publishes, the checks a node makes before it lets a bundle near the daemon, and the
//! on-disk copy of the last bundle the daemon applied.
//!
//! # Canonical form
//!
//! The signature covers [`canonical_bytes`], not the protobuf encoding (which is not
//! canonical: field order and unknown fields may vary between encoders):
//!
//! ```text
//! b"enforcer-bundle-v2\0"          domain separation: no other signed message starts so
//! version            u64 big-endian
//! issued_at_unix_ms  i64 big-endian
//! len(source)        u32 big-endian, then the source bytes (UTF-8)
//! len(target)        u32 big-endian, then the target's text form ([`Target`], UTF-8)
//! len(policy)        u32 big-endian, then the policy bytes (the TOML file, verbatim)
//! ```
//!
//! The length prefixes make the encoding injective, so no two different bundles share a
//! signed message. `key_id` is not signed: it only picks the key, and a wrong one fails
//! verification anyway.
//!
//! The target is signed so that a bundle cannot be replayed to a node it was not meant
//! for: node A's newer bundle handed to node B fails B's check even though its signature
//! and version are good. Version 1 of the form had no target; a node refuses v1 bundles
//! (their signature does not verify under v2), so after an upgrade a node enforces its
//! stored v1 bundle's floor and waits for the next publish (see [`BundleStore::load`]).
//!
//! # Keys
//!
//! [`keygen`] writes `signing.key` (the PKCS#8 document ring produces, base64, mode 0600)
//! for the control plane and `signing.pub` (the raw 32-byte public key, base64) whose text
//! goes into every node's `trusted_keys`. A key's id ([`key_id`]) is the hex of the first 8
//! bytes of SHA-256 of the raw public key. Rotation: add the new public key to the nodes'
//! `trusted_keys`, switch the control plane to the new private key, then drop the old
//! public key.
//!
//! # What a node checks
//!
//! [`Verifier::verify`] rejects, in this order, an unsigned bundle, a key id no trusted key
//! has, a signature that does not verify, and a version not newer than the one the node
//! holds (a replayed old bundle). Whether the policy itself is valid is the daemon's call;
//! [`VerifiedBundle::parse_policy`] parses it and words the error for a NACK. Every
//! [`BundleError`] displays as one lowercase line that goes into the NACK as it is.
//!
//! # Persistence
//!
//! [`BundleStore`] keeps the last applied bundle in the daemon's state directory
//! (`bundle.pb`, the protobuf encoding) so a restarted node enforces it before the control
//! plane answers, and tells the control plane which version it holds. It is verified again
//! on load: a file edited on disk is rejected like a forged bundle on the wire.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use prost::Message as _;
use ring::{
    digest,
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use thiserror::Error;

use crate::{
    controlplane::proto::Bundle,
    policy::{self, Policy},
};

/// Prefix of every signed message, so a bundle signature can never be mistaken for a
/// signature over anything else made with the same key.
pub const DOMAIN: &[u8] = b"enforcer-bundle-v2\0";

/// File name of the private signing key [`keygen`] writes.
pub const PRIVATE_KEY_FILE: &str = "signing.key";

/// File name of the public key [`keygen`] writes.
pub const PUBLIC_KEY_FILE: &str = "signing.pub";

/// File name of the stored bundle inside the daemon's state directory.
pub const STORE_FILE: &str = "bundle.pb";

/// The store's rollback floor in the state directory: the highest bundle version the node
/// ever applied, as decimal text. Kept apart from the bundle, which can stop verifying.
pub const FLOOR_FILE: &str = "bundle.floor";

/// Length in bytes of an Ed25519 public key.
const PUBLIC_KEY_LEN: usize = 32;

/// Why a bundle was rejected. Each variant displays as one lowercase line suitable as a
/// NACK reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BundleError {
    /// The signature field is empty.
    #[error("unsigned bundle: version {version} has an empty signature")]
    Unsigned {
        /// The bundle's version.
        version: u64,
    },
    /// No trusted key has the bundle's key id.
    #[error("unknown key id {key_id:?} on version {version} (trusted: {trusted})")]
    UnknownKey {
        /// The bundle's version.
        version: u64,
        /// The key id the bundle names.
        key_id: String,
        /// Ids of the trusted keys, comma-separated.
        trusted: String,
    },
    /// The signature does not verify with the named key: the bundle was altered or signed
    /// by another key.
    #[error("bad signature on version {version} (key id {key_id})")]
    BadSignature {
        /// The bundle's version.
        version: u64,
        /// The key id the bundle names.
        key_id: String,
    },
    /// The version is not newer than the one the node holds: a replay of an old bundle.
    #[error("rollback: version {version} is not newer than the held version {held}")]
    Rollback {
        /// The bundle's version.
        version: u64,
        /// The version the node holds.
        held: u64,
    },
    /// A field does not fit the canonical form's 32-bit length prefix.
    #[error("bundle {field} is too large to sign: {len} bytes")]
    TooLarge {
        /// `source` or `policy`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The bundle is signed for other nodes: another node's, or a selector this node's
    /// labels do not match.
    #[error("wrong target: version {version} is for {target}, not node {node:?} (labels {labels})")]
    WrongTarget {
        /// The bundle's version.
        version: u64,
        /// The bundle's target, text form.
        target: String,
        /// This node's id.
        node: String,
        /// This node's labels, `k=v,...`.
        labels: String,
    },
    /// The target field is not a valid [`Target`].
    #[error("bad target {target:?} on version {version}: {message}")]
    BadTarget {
        /// The bundle's version.
        version: u64,
        /// The field as received.
        target: String,
        /// What was expected.
        message: String,
    },
    /// The signed policy is not a valid policy document.
    #[error("malformed policy: {message}")]
    MalformedPolicy {
        /// Every problem, `file:line:column: field: message`, joined with `; `.
        message: String,
    },
}

impl BundleError {
    /// A short stable name for the rejection (`unsigned`, `unknown_key`, `bad_signature`,
    /// `rollback`, `too_large`, `wrong_target`, `bad_target`, `malformed_policy`), for
    /// metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            BundleError::Unsigned { .. } => "unsigned",
            BundleError::UnknownKey { .. } => "unknown_key",
            BundleError::BadSignature { .. } => "bad_signature",
            BundleError::Rollback { .. } => "rollback",
            BundleError::TooLarge { .. } => "too_large",
            BundleError::WrongTarget { .. } => "wrong_target",
            BundleError::BadTarget { .. } => "bad_target",
            BundleError::MalformedPolicy { .. } => "malformed_policy",
        }
    }
}

/// Errors reading, writing or decoding keys.
#[derive(Debug, Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("reading key file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A key file could not be written.
    #[error("writing key file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// [`keygen`] found a key file already there.
    #[error("{} already exists; refusing to overwrite a key", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Key text is not base64.
    #[error("{origin}: expected base64 key text")]
    Base64 {
        /// The file or configuration field.
        origin: String,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// A public key has the wrong length.
    #[error("{origin}: expected a 32-byte Ed25519 public key, got {len} bytes")]
    PublicKeyLength {
        /// The file or configuration field.
        origin: String,
        /// Bytes decoded.
        len: usize,
    },
    /// A private key is not an Ed25519 PKCS#8 document.
    #[error("{origin}: not an Ed25519 PKCS#8 private key ({reason})")]
    Pkcs8 {
        /// The file.
        origin: String,
        /// ring's reason.
        reason: String,
    },
    /// A verifier needs at least one key.
    #[error("no trusted keys: at least one public key is needed to verify bundles")]
    NoTrustedKeys,
    /// The operating system's random number generator failed.
    #[error("generating a key: the system random number generator failed")]
    Random,
}

/// Errors keeping the last applied bundle on disk.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The stored bundle could not be read.
    #[error("reading stored bundle {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The bundle could not be written.
    #[error("writing stored bundle {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a protobuf `Bundle`.
    #[error("decoding stored bundle {}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        #[source]
        source: prost::DecodeError,
    },
    /// The rollback floor file holds no version.
    #[error("{}: not a bundle version: {text:?}", path.display())]
    Floor {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// The stored bundle does not verify with the configured keys: it was altered on disk,
    /// or the trusted keys changed since it was stored.
    #[error("stored bundle {} failed verification", path.display())]
    Rejected {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BundleError,
    },
}

/// The bytes a bundle signature covers; see the module documentation for the layout.
pub fn canonical_bytes(
    version: u64,
    issued_at_unix_ms: i64,
    source: &str,
    target: &str,
    policy: &[u8],
) -> Result<Vec<u8>, BundleError> {
    let prefix = |field, len: usize| {
        u32::try_from(len)
            .map(u32::to_be_bytes)
            .map_err(|_| BundleError::TooLarge { field, len })
    };
    let mut out = Vec::with_capacity(
        DOMAIN.len() + 8 + 8 + 4 + source.len() + 4 + target.len() + 4 + policy.len(),
    );
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&issued_at_unix_ms.to_be_bytes());
    out.extend_from_slice(&prefix("source", source.len())?);
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(&prefix("target", target.len())?);
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(&prefix("policy", policy.len())?);
    out.extend_from_slice(policy);
    Ok(out)
}

/// The id of a public key: hex of the first 8 bytes of SHA-256 of its 32 raw bytes.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = digest::digest(&digest::SHA256, public_key);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A trusted Ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    raw: [u8; PUBLIC_KEY_LEN],
    key_id: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id)
    }
}

impl PublicKey {
    /// Decodes the base64 of a raw 32-byte key; `origin` names the text in errors (a file,
    /// or a configuration field like `trusted_keys[1]`).
    pub fn from_base64(text: &str, origin: &str) -> Result<PublicKey, KeyError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|source| KeyError::Base64 {
                origin: origin.to_owned(),
                source,
            })?;
        let raw: [u8; PUBLIC_KEY_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::PublicKeyLength {
                    origin: origin.to_owned(),
                    len: bytes.len(),
                })?;
        Ok(PublicKey {
            key_id: key_id(&raw),
            raw,
        })
    }

    /// Reads a `signing.pub` file.
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        PublicKey::from_base64(&text, &path.display().to_string())
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw key as base64, the form `trusted_keys` and `signing.pub` hold.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.raw)
    }
}

/// The control plane's private key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public.key_id)
    }
}

impl SigningKey {
    /// A fresh random key (for tests and [`keygen`]).
    pub fn generate() -> Result<SigningKey, KeyError> {
        let pkcs8 = generate_pkcs8()?;
        SigningKey::from_pkcs8(&pkcs8, "generated key")
    }

    /// Parses a PKCS#8 v2 document as ring writes it; `origin` names it in errors.
    pub fn from_pkcs8(der: &[u8], origin: &str) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| KeyError::Pkcs8 {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        let raw: [u8; PUBLIC_KEY_LEN] = pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("ed25519 public keys are 32 bytes");
        Ok(SigningKey {
            pair,
            public: PublicKey {
                key_id: key_id(&raw),
                raw,
            },
        })
    }

    /// Reads a `signing.key` file (base64 of the PKCS#8 document).
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let der = BASE64
            .decode(text.trim())
            .map_err(|source| KeyError::Base64 {
                origin: origin.clone(),
                source,
            })?;
        SigningKey::from_pkcs8(&der, &origin)
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs a policy into a bundle for the nodes `target` names.
    pub fn sign(
        &self,
        version: u64,
        issued_at_unix_ms: i64,
        source: &str,
        target: &Target,
        policy: Vec<u8>,
    ) -> Result<Bundle, BundleError> {
        let target = target.to_string();
        let message = canonical_bytes(version, issued_at_unix_ms, source, &target, &policy)?;
        Ok(Bundle {
            version,
            policy,
            key_id: self.public.key_id.clone(),
            signature: self.pair.sign(&message).as_ref().to_vec(),
            issued_at_unix_ms,
            source: source.to_owned(),
            target,
        })
    }
}

fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| KeyError::Random)
}

/// Where [`keygen`] put the key pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPaths {
    /// `signing.key`: the control plane's `signing_key`.
    pub private_key: PathBuf,
    /// `signing.pub`: its text goes into the nodes' `trusted_keys`.
    pub public_key: PathBuf,
    /// The new key's id.
    pub key_id: String,
}

/// Generates a key pair into `dir` (created if missing): `signing.key`, mode 0600, and
/// `signing.pub`. Refuses to overwrite either file: replacing a signing key by accident
/// would leave every node rejecting the control plane.
pub fn keygen(dir: &Path) -> Result<KeyPaths, KeyError> {
    let private_key = dir.join(PRIVATE_KEY_FILE);
    let public_key = dir.join(PUBLIC_KEY_FILE);
    for path in [&private_key, &public_key] {
        if path.exists() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let pkcs8 = generate_pkcs8()?;
    let key = SigningKey::from_pkcs8(&pkcs8, "generated key")?;
    write_new(&private_key, 0o600, &format!("{}\n", BASE64.encode(&pkcs8)))?;
    write_new(&public_key, 0o644, &format!("{}\n", key.public.to_base64()))?;
    Ok(KeyPaths {
        private_key,
        public_key,
        key_id: key.public.key_id,
    })
}

/// Creates `path` with `mode` (never replacing a file) and writes `text`.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), KeyError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_owned(),
            },
            _ => KeyError::Write {
                path: path.to_owned(),
                source,
            },
        })
}

/// Which nodes a bundle is for; signed with it ([`canonical_bytes`]).
///
/// Text form (the `target` field of a bundle, and `--node`/`--selector` on the command
/// line): `all`, `node:<id>`, or `selector:<key>=<value>[,<key>=<value>...]` with the keys
/// sorted, so one set of labels has one text form and one signature.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Every node.
    All,
    /// The node with this id.
    Node(String),
    /// Every node whose labels include all of these.
    Selector(BTreeMap<String, String>),
}

/// Whether `text` may be a node id, a label key or a label value: what a DNS-style name and
/// a Kubernetes-style label use, so the text form needs no escaping.
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
}

impl Target {
    /// Parses the text form; the error says what was expected.
    pub fn parse(text: &str) -> Result<Target, String> {
        if text == "all" {
            return Ok(Target::All);
        }
        if let Some(id) = text.strip_prefix("node:") {
            if !is_name(id) {
                return Err(format!(
                    "node id {id:?}: expected letters, digits, '.', '-', '_' or '/'"
                ));
            }
            return Ok(Target::Node(id.to_owned()));
        }
        if let Some(pairs) = text.strip_prefix("selector:") {
            return Target::selector(pairs);
        }
        Err("expected all, node:<id> or selector:<key>=<value>[,...]".into())
    }

    /// Parses `key=value[,key=value...]` into a selector (keys in any order).
    pub fn selector(pairs: &str) -> Result<Target, String> {
        let mut labels = BTreeMap::new();
        for pair in pairs.split(',') {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(format!("{pair:?}: expected key=value"));
            };
            if !is_name(key) || !is_name(value) {
                return Err(format!(
                    "{pair:?}: keys and values are letters, digits, '.', '-', '_' or '/'"
                ));
            }
            if labels.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(format!("{key:?} given twice"));
            }
        }
        Ok(Target::Selector(labels))
    }

    /// Whether a node with this id and these labels is targeted.
    pub fn matches(&self, node_id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Target::All => true,
            Target::Node(id) => id == node_id,
            Target::Selector(wanted) => wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }

    /// How specific the target is, for choosing among several that match one node: a
    /// node's own bundle beats any selector, a selector with more labels beats one with
    /// fewer, and `all` comes last.
    pub fn specificity(&self) -> usize {
        match self {
            Target::All => 0,
            Target::Selector(labels) => labels.len(),
            Target::Node(_) => usize::MAX,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Node(id) => write!(f, "node:{id}"),
            Target::Selector(labels) => {
                f.write_str("selector:")?;
                f.write_str(&labels_text(labels))
            }
        }
    }
}

/// Labels as `k=v,k2=v2` (sorted by key).
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Who the verifying node is: what a bundle's [`Target`] is matched against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node's id (`node_id` in its configuration; the name in its client certificate).
    pub node_id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Checks bundles against the trusted public keys and this node's identity. More than one
/// key is trusted during a rotation.
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: BTreeMap<String, PublicKey>,
    node: NodeIdentity,
}

impl Verifier {
    /// Builds a verifier for `node` from base64 public keys, as the `trusted_keys`
    /// configuration field holds them; errors name the entry (`trusted_keys[1]`).
    pub fn new<S: AsRef<str>>(
        trusted_keys: &[S],
        node: NodeIdentity,
    ) -> Result<Verifier, KeyError> {
        let keys = trusted_keys
            .iter()
            .enumerate()
            .map(|(i, text)| PublicKey::from_base64(text.as_ref(), &format!("trusted_keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Verifier::from_keys(keys, node)
    }

    /// Builds a verifier for `node` from parsed keys.
    pub fn from_keys(
        keys: impl IntoIterator<Item = PublicKey>,
        node: NodeIdentity,
    ) -> Result<Verifier, KeyError> {
        let keys: BTreeMap<_, _> = keys.into_iter().map(|k| (k.key_id.clone(), k)).collect();
        if keys.is_empty() {
            return Err(KeyError::NoTrustedKeys);
        }
        Ok(Verifier { keys, node })
    }

    /// The node this verifier checks targets for.
    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    /// Ids of the trusted keys, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks that `bundle` is signed by a trusted key, meant for this node and newer than
    /// `held_version` (the version the node enforces; 0 for none). Authenticity is checked
    /// before the target and the version, so those errors always name a genuine bundle.
    pub fn verify(
        &self,
        bundle: &Bundle,
        held_version: u64,
    ) -> Result<VerifiedBundle, BundleError> {
        let version = bundle.version;
        if bundle.signature.is_empty() {
            return Err(BundleError::Unsigned { version });
        }
        let key = self
            .keys
            .get(&bundle.key_id)
            .ok_or_else(|| BundleError::UnknownKey {
                version,
                key_id: bundle.key_id.clone(),
                trusted: self.key_ids().collect::<Vec<_>>().join(", "),
            })?;
        let message = canonical_bytes(
            version,
            bundle.issued_at_unix_ms,
            &bundle.source,
            &bundle.target,
            &bundle.policy,
        )?;
        UnparsedPublicKey::new(&ED25519, &key.raw)
            .verify(&message, &bundle.signature)
            .map_err(|_| BundleError::BadSignature {
                version,
                key_id: bundle.key_id.clone(),
            })?;
        let target = Target::parse(&bundle.target).map_err(|message| BundleError::BadTarget {
            version,
            target: bundle.target.clone(),
            message,
        })?;
        if !target.matches(&self.node.node_id, &self.node.labels) {
            return Err(BundleError::WrongTarget {
                version,
                target: bundle.target.clone(),
                node: self.node.node_id.clone(),
                labels: labels_text(&self.node.labels),
            });
        }
        if version <= held_version {
            return Err(BundleError::Rollback {
                version,
                held: held_version,
            });
        }
        Ok(VerifiedBundle {
            bundle: bundle.clone(),
        })
    }
}

/// A bundle whose signature checked out against a trusted key and whose version was newer
/// than the node's. Only [`Verifier::verify`] makes one, so holding one means that.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedBundle {
    bundle: Bundle,
}

impl VerifiedBundle {
    /// The bundle's version.
    pub fn version(&self) -> u64 {
        self.bundle.version
    }

    /// The policy TOML, verbatim.
    pub fn policy(&self) -> &[u8] {
        &self.bundle.policy
    }

    /// Where the control plane read the policy (`default.toml`, `nodes/<id>.toml`).
    pub fn source(&self) -> &str {
        &self.bundle.source
    }

    /// Id of the key that signed it.
    pub fn key_id(&self) -> &str {
        &self.bundle.key_id
    }

    /// When it was signed, milliseconds since the Unix epoch.
    pub fn issued_at_unix_ms(&self) -> i64 {
        self.bundle.issued_at_unix_ms
    }

    /// The bundle as it came over the wire.
    pub fn as_proto(&self) -> &Bundle {
        &self.bundle
    }

    /// Name used for the policy in error locations: `<source>@v<version>`, e.g.
    /// `default.toml@v1712345678901`.
    pub fn origin(&self) -> String {
        let source = if self.bundle.source.is_empty() {
            "bundle"
        } else {
            &self.bundle.source
        };
        format!("{source}@v{}", self.bundle.version)
    }

    /// Parses and validates the policy. The error reads `malformed policy:
    /// <source>@v<version>:line:column: field: message` (all problems, `; `-separated), ready
    /// for a NACK.
    pub fn parse_policy(&self) -> Result<Policy, BundleError> {
        let origin = self.origin();
        let text =
            std::str::from_utf8(&self.bundle.policy).map_err(|e| BundleError::MalformedPolicy {
                message: format!("{origin}: not UTF-8 ({e})"),
            })?;
        policy::parse(&origin, text).map_err(|e| BundleError::MalformedPolicy {
            message: e.to_string().replace('\n', "; "),
        })
    }
}

/// The last bundle the daemon applied, kept in its state directory.
///
/// The daemon saves a bundle before applying it (and puts the previous one back if the apply
/// fails), so an ACK means the bundle is enforcing *and* on disk; at start-up it loads the
/// bundle, applies it, and passes its version to [`crate::controlplane::sync::run`] as the
/// held version. Beside it, the rollback floor ([`FLOOR_FILE`]) is never lowered: when the
/// stored bundle no longer verifies, the floor still refuses every older version.
#[derive(Clone, Debug)]
pub struct BundleStore {
    path: PathBuf,
    floor: PathBuf,
}

impl BundleStore {
    /// The store in `state_dir` (files [`STORE_FILE`] and [`FLOOR_FILE`]).
    pub fn new(state_dir: &Path) -> BundleStore {
        BundleStore {
            path: state_dir.join(STORE_FILE),
            floor: state_dir.join(FLOOR_FILE),
        }
    }

    /// The highest version ever applied (0: none recorded). A missing file is 0; an
    /// unreadable or garbled one is an error, for the caller to report.
    pub fn floor(&self) -> Result<u64, StoreError> {
        let text = match fs::read_to_string(&self.floor) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.floor.clone(),
                    source,
                });
            }
        };
        text.trim().parse().map_err(|_| StoreError::Floor {
            path: self.floor.clone(),
            text,
        })
    }

    /// Raises the rollback floor to `version`; never lowers it.
    pub fn raise_floor(&self, version: u64) -> Result<(), StoreError> {
        if version <= self.floor().unwrap_or(0) {
            return Ok(());
        }
        crate::durable::replace(&self.floor, format!("{version}\n").as_bytes(), 0o644).map_err(
            |source| StoreError::Write {
                path: self.floor.clone(),
                source,
            },
        )
    }

    /// The stored bundle's bytes as they are, to put back with [`BundleStore::restore`].
    pub fn read_raw(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Puts back what [`BundleStore::read_raw`] returned (`None`: no bundle).
    pub fn restore(&self, previous: Option<&[u8]>) -> Result<(), StoreError> {
        let restored = match previous {
            Some(bytes) => crate::durable::replace(&self.path, bytes, 0o644),
            None => match fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => crate::durable::sync_dir(&self.path),
            },
        };
        restored.map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// The file the bundle is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the stored bundle atomically: write a temporary file, sync it, rename it
    /// over the old one, sync the directory. A crash leaves the old bundle or the new one.
    pub fn save(&self, bundle: &VerifiedBundle) -> Result<(), StoreError> {
        crate::durable::replace(&self.path, &bundle.bundle.encode_to_vec(), 0o644).map_err(
            |source| StoreError::Write {
                path: self.path.clone(),
                source,
            },
        )
    }

    /// Loads and re-verifies the stored bundle; `Ok(None)` when there is none.
    pub fn load(&self, verifier: &Verifier) -> Result<Option<VerifiedBundle>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let bundle = Bundle::decode(bytes.as_slice()).map_err(|source| StoreError::Decode {
            path: self.path.clone(),
            source,
        })?;
        verifier
            .verify(&bundle, 0)
            .map(Some)
            .map_err(|source| StoreError::Rejected {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const POLICY: &str = "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\n";

    fn signed(key: &SigningKey, version: u64) -> Bundle {
        key.sign(
            version,
            1_700_000_000_000,
            "default.toml",
            &Target::All,
            POLICY.into(),
        )
        .unwrap()
    }

    fn node(id: &str, labels: &[(&str, &str)]) -> NodeIdentity {
        NodeIdentity {
            node_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn verifier_for<S: AsRef<str>>(keys: &[S]) -> Result<Verifier, KeyError> {
        Verifier::new(keys, node("n1", &[("zone", "eu-1")]))
    }

    #[test]
    fn canonical_form_is_stable() {
        let bytes = canonical_bytes(0x0102_0304_0506_0708, -2, "ab", "all", b"xyz").unwrap();
        let mut golden = b"enforcer-bundle-v2\0".to_vec();
        golden.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        golden.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        golden.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        golden.extend_from_slice(&[0, 0, 0, 3, b'a', b'l', b'l']);
        golden.extend_from_slice(&[0, 0, 0, 3, b'x', b'y', b'z']);
        assert_eq!(bytes, golden);
        // Moving a byte between fields changes the message.
        assert_ne!(
            canonical_bytes(1, 0, "ab", "all", b"c").unwrap(),
            canonical_bytes(1, 0, "a", "all", b"bc").unwrap()
        );
        assert_ne!(
            canonical_bytes(1, 0, "a", "node:b", b"c").unwrap(),
            canonical_bytes(1, 0, "a", "node:", b"bc").unwrap()
        );
    }

    #[test]
    fn key_id_is_sha256_prefix_hex() {
        // SHA-256 of 32 zero bytes starts 66687aadf862bd77.
        assert_eq!(key_id(&[0; 32]), "66687aadf862bd77");
    }

    #[test]
    fn sign_verify_roundtrip() {
        let key = SigningKey::generate().unwrap();
        let verifier = verifier_for(&[key.public_key().to_base64()]).unwrap();
        let verified = verifier.verify(&signed(&key, 7), 6).unwrap();
        assert_eq!(verified.version(), 7);
        assert_eq!(verified.policy(), POLICY.as_bytes());
        assert_eq!(verified.source(), "default.toml");
        assert_eq!(verified.key_id(), key.public_key().key_id());
        assert_eq!(verified.issued_at_unix_ms(), 1_700_000_000_000);
        assert_eq!(verified.parse_policy().unwrap().agents().len(), 1);
    }

    #[test]
    fn each_rejection_has_its_reason() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let verifier = verifier_for(&[key.public_key().to_base64()]).unwrap();

        let mut unsigned = signed(&key, 7);
        unsigned.signature.clear();
        let e = verifier.verify(&unsigned, 0).unwrap_err();
        assert_eq!(e, BundleError::Unsigned { version: 7 });
        assert_eq!(
            e.to_string(),
            "unsigned bundle: version 7 has an empty signature"
        );

        let e = verifier.verify(&signed(&other, 7), 0).unwrap_err();
        assert_eq!(e.kind(), "unknown_key");
        assert_eq!(
            e.to_string(),
            format!(
                "unknown key id {:?} on version 7 (trusted: {})",
                other.public_key().key_id(),
                key.public_key().key_id()
            )
        );

        // Altering any signed field breaks the signature.
        let alterations: [fn(&mut Bundle); 5] = [
            |b| b.policy.push(b'\n'),
            |b| b.version += 1,
            |b| b.issued_at_unix_ms += 1,
            |b| b.source.push('x'),
            |b| b.target = "node:n1".into(),
        ];
        for alter in alterations {
            let mut bundle = signed(&key, 7);
            alter(&mut bundle);
            let e = verifier.verify(&bundle, 0).unwrap_err();
            assert_eq!(e.kind(), "bad_signature", "{e}");
            assert!(e.to_string().starts_with("bad signature on version"), "{e}");
        }
        // Another key's signature under this key's id.
        let mut forged = signed(&other, 7);
        forged.key_id = key.public_key().key_id().to_owned();
        assert_eq!(
            verifier.verify(&forged, 0).unwrap_err().kind(),
            "bad_signature"
        );

        for held in [7, 8] {
            let e = verifier.verify(&signed(&key, 7), held).unwrap_err();
            assert_eq!(e, BundleError::Rollback { version: 7, held });
            assert_eq!(
                e.to_string(),
                format!("rollback: version 7 is not newer than the held version {held}")
            );
        }

        let bad = key
            .sign(
                8,
                0,
                "nodes/n1.toml",
                &Target::Node("n1".into()),
                b"[[agents]]\nid = 0\nname = \"a\"\nrate = { packets_per_sec = 0 }\n".to_vec(),
            )
            .unwrap();
        let e = verifier
            .verify(&bad, 7)
            .unwrap()
            .parse_policy()
            .unwrap_err();
        assert_eq!(e.kind(), "malformed_policy");
        let msg = e.to_string();
        assert!(
            msg.starts_with("malformed policy: nodes/n1.toml@v8:2:"),
            "{msg}"
        );
        assert!(!msg.contains('\n') && msg.contains("; "), "{msg}");

        let not_utf8 = key
            .sign(9, 0, "default.toml", &Target::All, vec![0xff])
            .unwrap();
        let e = verifier
            .verify(&not_utf8, 0)
            .unwrap()
            .parse_policy()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("malformed policy: default.toml@v9: not UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn a_bundle_for_other_nodes_is_refused() {
        let key = SigningKey::generate().unwrap();
        let verifier = verifier_for(&[key.public_key().to_base64()]).unwrap();
        let for_target = |target: &str| {
            let target = Target::parse(target).unwrap();
            key.sign(5, 0, "publish", &target, POLICY.into()).unwrap()
        };
        for ok in ["all", "node:n1", "selector:zone=eu-1"] {
            verifier.verify(&for_target(ok), 0).unwrap();
        }
        for wrong in [
            "node:n2",
            "selector:zone=eu-2",
            "selector:tier=gpu,zone=eu-1",
        ] {
            let e = verifier.verify(&for_target(wrong), 0).unwrap_err();
            assert_eq!(e.kind(), "wrong_target", "{e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "wrong target: version 5 is for {wrong}, not node \"n1\" (labels zone=eu-1)"
                )
            );
        }
        // The target is checked before the version: a replay of another node's old bundle
        // names the target.
        assert_eq!(
            verifier
                .verify(&for_target("node:n2"), 9)
                .unwrap_err()
                .kind(),
            "wrong_target"
        );
        // A signed but unparseable target.
        let mut odd = for_target("all");
        odd.target = "everyone".into();
        let message = canonical_bytes(5, 0, "publish", "everyone", POLICY.as_bytes()).unwrap();
        odd.signature = key.pair.sign(&message).as_ref().to_vec();
        assert_eq!(verifier.verify(&odd, 0).unwrap_err().kind(), "bad_target");
    }

    #[test]
    fn target_text_forms() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        // Keys sorted: one set of labels, one text form.
        let t = Target::parse("selector:zone=eu-1,tier=gpu").unwrap();
        assert_eq!(t.to_string(), "selector:tier=gpu,zone=eu-1");
        assert!(t.matches(
            "x",
            &labels(&[("tier", "gpu"), ("zone", "eu-1"), ("a", "b")])
        ));
        assert!(!t.matches("x", &labels(&[("zone", "eu-1")])));
        assert_eq!(
            Target::parse("node:edge-1").unwrap().to_string(),
            "node:edge-1"
        );
        assert!(Target::All.specificity() < t.specificity());
        assert!(t.specificity() < Target::Node("n".into()).specificity());
        for bad in [
            "",
            "node:",
            "node:a b",
            "selector:",
            "selector:a",
            "selector:a=1,a=2",
            "x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn two_trusted_keys_for_rotation() {
        let old = SigningKey::generate().unwrap();
        let new = SigningKey::generate().unwrap();
        let retired = SigningKey::generate().unwrap();
        let verifier =
            verifier_for(&[old.public_key().to_base64(), new.public_key().to_base64()]).unwrap();
        assert_eq!(verifier.key_ids().count(), 2);
        assert_eq!(verifier.verify(&signed(&old, 1), 0).unwrap().version(), 1);
        assert_eq!(verifier.verify(&signed(&new, 2), 1).unwrap().version(), 2);
        assert_eq!(
            verifier.verify(&signed(&retired, 3), 2).unwrap_err().kind(),
            "unknown_key"
        );
    }

    #[test]
    fn trusted_key_errors_name_the_entry() {
        let good = SigningKey::generate().unwrap().public_key().to_base64();
        let e = verifier_for(&[good.as_str(), "not base64!"]).unwrap_err();
        assert_eq!(e.to_string(), "trusted_keys[1]: expected base64 key text");
        let e = verifier_for(&["AAAA"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "trusted_keys[0]: expected a 32-byte Ed25519 public key, got 3 bytes"
        );
        assert!(matches!(
            verifier_for::<&str>(&[]),
            Err(KeyError::NoTrustedKeys)
        ));
    }

    #[test]
    fn keygen_writes_loadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = keygen(dir.path()).unwrap();
        assert_eq!(paths.private_key, dir.path().join("signing.key"));
        let mode = fs::metadata(&paths.private_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let key = SigningKey::load(&paths.private_key).unwrap();
        let public = PublicKey::load(&paths.public_key).unwrap();
        assert_eq!(key.public_key(), &public);
        assert_eq!(public.key_id(), paths.key_id);
        let text = fs::read_to_string(&paths.public_key).unwrap();
        let verifier = verifier_for(&[text]).unwrap();
        verifier.verify(&signed(&key, 1), 0).unwrap();

        let e = keygen(dir.path()).unwrap_err();
        assert!(matches!(e, KeyError::Exists { .. }), "{e}");
    }

    #[test]
    fn key_loaders_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let e = SigningKey::load(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("reading key file {}", path.display())
        );
        fs::write(&path, "AAAA\n").unwrap();
        let e = SigningKey::load(&path).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: not an Ed25519 PKCS#8", path.display())),
            "{e}"
        );
        let public = dir.path().join("signing.pub");
        fs::write(&public, "%%%\n").unwrap();
        let e = PublicKey::load(&public).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: expected base64 key text", public.display())
        );
    }

    #[test]
    fn store_roundtrip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let verifier = verifier_for(&[key.public_key().to_base64()]).unwrap();
        let store = BundleStore::new(dir.path());
        assert_eq!(store.load(&verifier).unwrap(), None);

        let first = verifier.verify(&signed(&key, 5), 0).unwrap();
        store.save(&first).unwrap();
        assert_eq!(store.load(&verifier).unwrap(), Some(first));
        let second = verifier.verify(&signed(&key, 6), 5).unwrap();
        store.save(&second).unwrap();
        assert_eq!(store.load(&verifier).unwrap(), Some(second.clone()));
        assert!(!dir.path().join("bundle.pb.tmp").exists());

        // Edit the policy inside the stored file, as an attacker with disk access might.
        let mut bundle = second.as_proto().clone();
        bundle.policy = POLICY.replace("10.0.0.1", "10.0.0.2").into_bytes();
        fs::write(store.path(), bundle.encode_to_vec()).unwrap();
        let e = store.load(&verifier).unwrap_err();
        assert!(
            matches!(&e, StoreError::Rejected { source, .. } if source.kind() == "bad_signature"),
            "{e}"
        );
        assert_eq!(
            crate::error::error_chain(&e),
            format!(
                "stored bundle {} failed verification: bad signature on version 6 (key id {})",
                store.path().display(),
                key.public_key().key_id()
            )
        );

        // Keys rotated away from the stored bundle's signer.
        store.save(&second).unwrap();
        let other = SigningKey::generate().unwrap();
        let rotated = verifier_for(&[other.public_key().to_base64()]).unwrap();
        let e = store.load(&rotated).unwrap_err();
        assert!(
            matches!(&e, StoreError::Rejected { source, .. } if source.kind() == "unknown_key"),
            "{e}"
        );

        fs::write(store.path(), b"\xff\xff\xff").unwrap();
        assert!(matches!(
            store.load(&verifier),
            Err(StoreError::Decode { .. })
        ));
    }
}
