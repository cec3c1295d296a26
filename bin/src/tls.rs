//! Certificate verification from the TLS flags (`--ca`, `--server-name`,
//! `--insecure`), shared by `client`, `get` and `quic-report-bench`, and the process-wide
//! trust store they rely on ([`trust_only_named_cas`]).

use quic_report_core::{CertFiles, Verify};

use crate::cli::TlsArgs;
use crate::devcerts::DevCerts;

/// Where BoringSSL's default trust store is pointed: nowhere.
const NO_DEFAULT_STORE: &str = "/nonexistent/quic-report-no-default-ca-store";

/// Empties BoringSSL's default trust store for this process, so that a
/// client trusts exactly the CAs its flags name: `--ca FILE`, or the
/// development CA. quiche's `Config::new` calls
/// `SSL_CTX_set_default_verify_paths`, which loads the file named by
/// `SSL_CERT_FILE` (else the system bundle) and the directory named by
/// `SSL_CERT_DIR`; without this, `--ca FILE` also trusted every system root
/// (and every `Config` parsed the whole system bundle). To trust
/// the system's CAs, name them: `--ca /etc/ssl/certs/ca-certificates.crt`.
///
/// # Safety
///
/// It sets environment variables: call it before any other thread exists.
pub unsafe fn trust_only_named_cas() {
    // SAFETY: the caller guarantees no other thread reads the environment.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", NO_DEFAULT_STORE);
        std::env::set_var("SSL_CERT_DIR", NO_DEFAULT_STORE);
    }
}

/// The verification the flags ask for and the name to check (the flag, or
/// `default_name`). Without `--ca` the built-in development CA is written
/// to `dev`, which must outlive the connection; that is for a server on
/// `loopback` only: the development CA's key is public (`certs/ca.key`),
/// so anyone on the path to a server elsewhere could sign a certificate
/// for its name and be taken for it. Without `--ca` (or `--insecure`) a
/// server elsewhere is an error.
pub fn verification(
    tls: &TlsArgs,
    default_name: String,
    loopback: bool,
    dev: &mut Option<DevCerts>,
) -> Result<(Verify, String), Box<dyn std::error::Error + Send + Sync>> {
    let verify = if tls.insecure {
        log::warn!("--insecure: the server's certificate is NOT verified");
        Verify::Insecure
    } else if let Some(ca) = &tls.ca {
        std::fs::File::open(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        Verify::CaFile(ca.clone())
    } else if loopback {
        Verify::CaFile(dev.insert(DevCerts::write()?).ca())
    } else {
        return Err(format!(
            "the server ({default_name}) is not on loopback: give --ca FILE, the CA that \
             signs its certificate (--ca /etc/ssl/certs/ca-certificates.crt for the system's \
             CAs). The built-in development CA is trusted for loopback only: its key is \
             public, so anyone on the way could pose as the server"
        )
        .into());
    };
    Ok((verify, tls.server_name.clone().unwrap_or(default_name)))
}

/// Our client certificate from `--cert`/`--key`, checked readable.
pub fn client_cert(
    tls: &TlsArgs,
) -> Result<Option<CertFiles>, Box<dyn std::error::Error + Send + Sync>> {
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            for (flag, path) in [("--cert", cert), ("--key", key)] {
                std::fs::File::open(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
            }
            Ok(Some(CertFiles {
                cert_chain: cert.clone(),
                private_key: key.clone(),
            }))
        }
        _ => Ok(None),
    }
}
