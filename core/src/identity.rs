//! Who is reporting: a connection's [`Identity`] (the subject common name of
//! its client certificate, or the anonymous identity), and [`RecordKey`],
//! the `(identity, client, seq)` key under which every report is
//! deduplicated and stored.
//!
//! ## Which name is the identity
//!
//! The identity of a connection whose peer presented a client certificate
//! (verified by TLS against the server's `--client-ca`) is the **subject
//! common name** (OID 2.5.4.3) of the peer's leaf certificate, taken
//! verbatim, compared byte for byte (no case folding, no Unicode
//! normalisation, no trimming). Nothing else in the certificate is read:
//! not the subject alternative names, not the other subject attributes, not
//! the issuer. A certificate whose name cannot be used is refused at the
//! handshake ([`IdentityError`]), never mapped to something else:
//!
//! | the subject has | treated as |
//! |---|---|
//! | exactly one CN, a `UTF8String`, `PrintableString` or `IA5String` of 1 to 64 characters without control characters | that name |
//! | no CN | refused: [`IdentityError::NoCommonName`] |
//! | several CNs (in one or in several RDNs) | refused: [`IdentityError::SeveralCommonNames`] (parsers disagree on which one counts) |
//! | a CN in another string type (`BMPString`, `TeletexString`, ...) or not valid in its type | refused: [`IdentityError::NotUtf8`] |
//! | an empty CN | refused: [`IdentityError::Empty`] (the empty name is the anonymous identity) |
//! | a CN with a control character (U+0000-U+001F, U+007F-U+009F) | refused: [`IdentityError::ControlCharacter`] |
//! | a CN over 64 characters (RFC 5280's `ub-common-name`) | refused: [`IdentityError::TooLong`] |
//! | a certificate that is not DER X.509 | refused: [`IdentityError::Unparseable`] |
//!
//! ## The anonymous identity
//!
//! A connection without a client certificate (only possible when the
//! server runs without `--client-ca`) has the anonymous identity, whose
//! name is **the empty string `""`**, everywhere: in [`RecordKey`], in the
//! `"identity"` field of a record (`"identity":""`), and in a database
//! column (which is `NOT NULL`; the empty string, never `NULL`). Since a
//! certificate's name is never empty, no certificate holder can be taken
//! for the anonymous identity, nor the other way round. A record read back
//! without an `"identity"` field (written before identities existed) is
//! the anonymous identity's.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The longest common name accepted, in characters (RFC 5280
/// `ub-common-name`).
pub const MAX_NAME_CHARS: usize = 64;

/// The authenticated identity of a connection: its client certificate's
/// subject common name, or the anonymous identity (the empty name). Cheap
/// to clone (shared).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(Arc<str>);

/// Why a certificate's name cannot be an identity (see the module
/// documentation for the rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate is not DER X.509 that we can parse.
    #[error("the certificate cannot be parsed: {0}")]
    Unparseable(String),
    /// The subject has no common name.
    #[error("the certificate's subject has no common name (CN)")]
    NoCommonName,
    /// The subject has more than one common name.
    #[error("the certificate's subject has {0} common names (CN); exactly one is required")]
    SeveralCommonNames(usize),
    /// The common name is not a string type we read as UTF-8.
    #[error(
        "the certificate's common name is not a UTF8String, PrintableString or IA5String, or is invalid"
    )]
    NotUtf8,
    /// The common name is empty.
    #[error("the certificate's common name is empty")]
    Empty,
    /// The common name holds a control character.
    #[error("the certificate's common name holds a control character")]
    ControlCharacter,
    /// The common name is longer than [`MAX_NAME_CHARS`].
    #[error("the certificate's common name is longer than {MAX_NAME_CHARS} characters")]
    TooLong,
}

impl Identity {
    /// The anonymous identity (the empty name).
    pub fn anonymous() -> Identity {
        Identity(Arc::from(""))
    }

    /// Whether this is the anonymous identity.
    pub fn is_anonymous(&self) -> bool {
        self.0.is_empty()
    }

    /// The name (`""` for the anonymous identity).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A name as a certificate would have to carry it: 1 to 64 characters,
    /// no control characters. For names given by a person (`--reader`).
    pub fn named(name: &str) -> Result<Identity, IdentityError> {
        check_name(name)?;
        Ok(Identity(Arc::from(name)))
    }

    /// A name read back from what this server wrote (a record's
    /// `"identity"` field, a database column), taken as it is: `""` is the
    /// anonymous identity.
    pub fn from_stored(name: &str) -> Identity {
        Identity(Arc::from(name))
    }

    /// The identity of a DER certificate: its subject's one common name,
    /// checked as the module documentation says.
    pub fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
        let mut names = cert.subject().iter_common_name();
        let first = names.next().ok_or(IdentityError::NoCommonName)?;
        let more = names.count();
        if more > 0 {
            return Err(IdentityError::SeveralCommonNames(more + 1));
        }
        let name = first.as_str().map_err(|_| IdentityError::NotUtf8)?;
        // x509-parser reads BMPString and UniversalString as well, without
        // checking them: accept only the types whose bytes are the text.
        use x509_parser::der_parser::asn1_rs::Tag;
        let tag = first.attr_value().header.tag();
        if ![Tag::Utf8String, Tag::PrintableString, Tag::Ia5String].contains(&tag) {
            return Err(IdentityError::NotUtf8);
        }
        Identity::named(name)
    }
}

fn check_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() {
        return Err(IdentityError::Empty);
    }
    if name.chars().any(char::is_control) {
        return Err(IdentityError::ControlCharacter);
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(IdentityError::TooLong);
    }
    Ok(())
}

impl Borrow<str> for Identity {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The name, or `(anonymous)` for the anonymous identity: for log lines.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_anonymous() {
            f.write_str("(anonymous)")
        } else {
            // Debug: quoted and escaped, so a name cannot forge a log line.
            write!(f, "{:?}", &*self.0)
        }
    }
}

/// The key of a recorded report: the identity that sent it, and the
/// `client` and `seq` it carries. The duplicate filter, `/latest`, the
/// `--out` file read back at start and the database sinks all key on it,
/// so a certificate holder can never make another identity's report count
/// as a duplicate, whatever `client` and `seq` it claims. A report without
/// both `client` and `seq` has no key (and is always recorded).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKey {
    /// Who sent it (the anonymous identity's name is `""`).
    pub identity: Identity,
    /// The report's `client` field.
    pub client: String,
    /// The report's `seq` field (1 or more).
    pub seq: u64,
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity={} client={:?} seq={}",
            self.identity, self.client, self.seq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(
            Identity::named("device-1").expect("fine").as_str(),
            "device-1"
        );
        assert_eq!(Identity::named(""), Err(IdentityError::Empty));
        assert_eq!(
            Identity::named("a\nb"),
            Err(IdentityError::ControlCharacter)
        );
        assert_eq!(
            Identity::named("a\u{85}b"),
            Err(IdentityError::ControlCharacter)
        );
        assert_eq!(
            Identity::named(&"é".repeat(64)).map(|i| i.as_str().chars().count()),
            Ok(64)
        );
        assert_eq!(
            Identity::named(&"x".repeat(65)),
            Err(IdentityError::TooLong)
        );
        assert!(Identity::anonymous().is_anonymous());
        assert_eq!(Identity::from_stored(""), Identity::anonymous());
        assert_eq!(Identity::anonymous().to_string(), "(anonymous)");
        assert_eq!(
            Identity::named("a\"b").expect("fine").to_string(),
            r#""a\"b""#
        );
    }

    fn der(pem: &[u8]) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("a PEM certificate");
        pem.contents
    }

    #[test]
    fn the_subject_common_name_is_the_identity() {
        let cert = der(include_bytes!("../../certs/clients/device-1.pem"));
        let id = Identity::from_certificate(&cert).expect("one CN");
        assert_eq!(id.as_str(), "device-1");
        let two = der(include_bytes!("../../certs/test/two-cn.pem"));
        assert_eq!(
            Identity::from_certificate(&two),
            Err(IdentityError::SeveralCommonNames(2))
        );
        let none = der(include_bytes!("../../certs/test/no-cn.pem"));
        assert_eq!(
            Identity::from_certificate(&none),
            Err(IdentityError::NoCommonName)
        );
    }

    #[test]
    fn junk_is_not_a_certificate() {
        assert!(matches!(
            Identity::from_certificate(b"not DER"),
            Err(IdentityError::Unparseable(_))
        ));
    }
}
