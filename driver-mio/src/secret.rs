//! [`read_secret_file`]: the server's long-lived secret from a file, for
//! `--secret-file` (instead of deriving it from the TLS private key).
//!
//! The file holds exactly 32 bytes, raw, or as 64 hex digits (surrounding
//! whitespace, such as a final newline, allowed). Make one with
//! `head -c 32 /dev/urandom > secret` or `openssl rand -hex 32 > secret`.

use std::path::Path;

use quic_report_core::ServerSecret;

use crate::DriverError;

/// Reads a [`ServerSecret`] from `path` (32 raw bytes or 64 hex digits).
/// Warns when the file can be read by others than its owner.
pub fn read_secret_file(path: &Path) -> Result<ServerSecret, DriverError> {
    let bytes = std::fs::read(path).map_err(|source| DriverError::File {
        path: path.to_owned(),
        source,
    })?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "secret file {} can be read by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    parse_secret(&bytes)
        .map(ServerSecret::from_bytes)
        .map_err(|why| DriverError::InvalidOption(format!("secret file {}: {why}", path.display())))
}

/// 32 raw bytes, or 64 hex digits with optional surrounding whitespace.
pub fn parse_secret(bytes: &[u8]) -> Result<[u8; 32], String> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Ok(raw);
    }
    let mut out = [0u8; 32];
    if hex::decode_to_slice(bytes.trim_ascii(), &mut out).is_ok() {
        return Ok(out);
    }
    Err(format!(
        "expected 32 bytes (raw) or 64 hex digits, found {} bytes",
        bytes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_hex_give_the_same_secret() {
        let raw: Vec<u8> = (0u8..32).collect();
        let hex: String = raw.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_secret(&raw).expect("raw").to_vec(), raw);
        let from_hex = parse_secret(format!("{hex}\n").as_bytes()).expect("hex");
        assert_eq!(from_hex.to_vec(), raw);
        assert_eq!(
            parse_secret(hex.to_lowercase().as_bytes()).expect("hex"),
            from_hex
        );
    }

    #[test]
    fn wrong_sizes_are_refused() {
        for bad in [&b""[..], &[0u8; 31], &[0u8; 33], &[b'g'; 64], &[b'a'; 63]] {
            let e = parse_secret(bad).expect_err("refused");
            assert!(e.contains("32 bytes"), "{e}");
        }
    }

    #[test]
    fn a_missing_file_names_itself() {
        let e = read_secret_file(Path::new("/nonexistent/secret")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/secret"), "{e}");
    }
}
