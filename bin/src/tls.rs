//! Certificate verification from the TLS flags (`--ca`, `--server-name`,
//! `--insecure`), shared by `client`, `bench` and `get`.

use quic_report_core::Verify;

use crate::cli::TlsArgs;
use crate::devcerts::DevCerts;

/// The verification the flags ask for and the name to check (the flag, or
/// `default_name`). Without `--ca` the built-in development CA is written
/// to `dev`, which must outlive the connection.
pub fn verification(
    tls: &TlsArgs,
    default_name: String,
    dev: &mut Option<DevCerts>,
) -> Result<(Verify, String), Box<dyn std::error::Error + Send + Sync>> {
    let verify = if tls.insecure {
        log::warn!("--insecure: the server's certificate is NOT verified");
        Verify::Insecure
    } else if let Some(ca) = &tls.ca {
        std::fs::File::open(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        Verify::CaFile(ca.clone())
    } else {
        Verify::CaFile(dev.insert(DevCerts::write()?).ca())
    };
    Ok((verify, tls.server_name.clone().unwrap_or(default_name)))
}
