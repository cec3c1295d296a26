//! The development certificates (`certs/` in the repository), built into
//! the binary so it works from any directory. quiche loads certificates from
//! file paths, so [`DevCerts::write`] puts them in a private temporary
//! directory, removed when the value is dropped.
//!
//! Development only: these keys are public.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const CA_PEM: &[u8] = include_bytes!("../../certs/ca.pem");
const CERT_PEM: &[u8] = include_bytes!("../../certs/localhost.pem");
const KEY_PEM: &[u8] = include_bytes!("../../certs/localhost.key");

/// Whether `pem` is the development certificate's private key (as in
/// `certs/localhost.key`), which is public.
pub fn is_dev_key(pem: &[u8]) -> bool {
    pem == KEY_PEM
}

/// The development CA, certificate and key, written to a private directory.
#[derive(Debug)]
pub struct DevCerts {
    dir: PathBuf,
}

impl DevCerts {
    /// Writes the three files to `<tmp>/quic-report-<pid>-<random>/` (mode
    /// 0700, files 0600).
    pub fn write() -> io::Result<DevCerts> {
        remove_stale();
        let name = format!(
            "quic-report-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let dir = std::env::temp_dir().join(name);
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|e| annotate(e, &dir))?;
        let certs = DevCerts { dir };
        for (name, bytes) in [
            ("ca.pem", CA_PEM),
            ("localhost.pem", CERT_PEM),
            ("localhost.key", KEY_PEM),
        ] {
            let path = certs.dir.join(name);
            write_private(&path, bytes).map_err(|e| annotate(e, &path))?;
        }
        log::debug!(
            "development certificates written to {}",
            certs.dir.display()
        );
        Ok(certs)
    }

    /// The development CA (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate for localhost, 127.0.0.1 and ::1 (PEM).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("localhost.pem")
    }

    /// The certificate's private key (PEM).
    pub fn key(&self) -> PathBuf {
        self.dir.join("localhost.key")
    }
}

impl Drop for DevCerts {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::debug!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Age after which a directory of a process that is gone is removed.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the directories of earlier processes that are gone (killed
/// before they could clean up). Best effort; Linux only (`/proc`).
fn remove_stale() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("quic-report-")) else {
            continue;
        };
        let Some((pid, tag)) = rest.split_once('-') else {
            continue;
        };
        let ours = pid.parse::<u32>().is_ok()
            && tag.len() == 16
            && tag.bytes().all(|b| b.is_ascii_hexdigit());
        // Old enough that even a process in another PID namespace sharing
        // this directory has loaded its certificates long ago.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if ours && old && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "writing the development certificates to {}: {e}",
            path.display()
        ),
    )
}
