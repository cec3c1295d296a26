//! A private PostgreSQL cluster for the tests and `make bench`: `initdb`
//! in a temporary directory, a free loopback port, its Unix socket in that
//! directory, stopped and removed when dropped (also when a test panics).
//!
//! PostgreSQL refuses to run as root, so as root every PostgreSQL program
//! runs as the `postgres` user (through `runuser`), which the `postgresql`
//! package creates; the directory is made theirs. The binaries are found
//! in `$QUIC_REPORT_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's layout), else on `PATH`.
//!
//! A cluster whose process was killed before it could stop it (SIGKILL,
//! a CI timeout) is stopped and removed by the next [`PgCluster::start`]
//! on the machine: its directory is named after the process that made it.
//!
//! Local (socket) connections are trusted; TCP connections need the
//! password of the `postgres` role, which is random per cluster and part of
//! [`PgCluster::url`].

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Makes `dir` with mode 0700 (its parents as the umask says).
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes `bytes` to a new file `path` with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A running private cluster.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
}

impl PgCluster {
    /// Creates and starts a cluster, or says why it cannot.
    pub fn start() -> Result<PgCluster, String> {
        let bin = find_bin()?;
        let as_postgres = is_root();
        sweep_orphans(&bin, as_postgres);
        let dir = std::env::temp_dir().join(format!(
            "quic-report-pg-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        // Its owner's only (and root's): the socket directory in it takes
        // local connections without a password, and the password file is
        // there until initdb has read it.
        private_dir(&dir)?;
        // Removed (with the directory) when dropped: also if what follows
        // fails.
        let mut cluster = PgCluster {
            port: 0,
            dir,
            bin,
            password: format!("{:016x}", rand_u64()),
            as_postgres,
        };
        private_dir(&cluster.dir.join("sock"))?;
        write_private(&cluster.dir.join("pwfile"), cluster.password.as_bytes())?;
        cluster.port = free_port()?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !ok.success() {
                return Err("cannot give the cluster directory to the postgres user".into());
            }
        }
        let data = cluster.data();
        cluster.run_ok(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                path_str(&cluster.dir.join("pwfile"))?,
                "--no-instructions",
                "-E",
                "UTF8",
            ],
        )?;
        let _ = std::fs::remove_file(cluster.dir.join("pwfile"));
        // The socket's directory in the configuration, not on pg_ctl's
        // command line: pg_ctl hands its options to a shell, which would
        // split a path with a space (or run what a `$(...)` in it says).
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
        let sock = path_str(&cluster.dir.join("sock"))?.replace('\'', "''");
        text.push_str(&format!(
            "\nunix_socket_directories = '{sock}'\nunix_socket_permissions = 0700\n"
        ));
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The cluster's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `postgres` role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A URL for database `db` as the `postgres` role, password included.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            self.password, self.port
        )
    }

    /// Starts the server (after [`PgCluster::kill`] or
    /// [`PgCluster::stop`]): on the same port, waiting until it accepts
    /// connections.
    pub fn start_server(&self) -> Result<(), String> {
        // Numbers and fixed words only: pg_ctl passes these through a shell.
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c max_connections=50",
            self.port
        );
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data())?,
                "-l",
                path_str(&self.dir.join("log"))?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Turns TLS on with this certificate chain and key (PEM), restarting
    /// the server: clients may then ask for `sslmode=require` or
    /// `verify-full`.
    pub fn enable_tls(&self, cert: &Path, key: &Path) -> Result<(), String> {
        let data = self.data();
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            std::fs::copy(from, data.join(to))
                .map_err(|e| format!("copying {}: {e}", from.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .map_err(|e| e.to_string())?;
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !ok.success() {
                return Err("cannot give the key to the postgres user".into());
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        self.stop()?;
        self.start_server()
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self) -> Result<(), String> {
        self.run_ok(
            "pg_ctl",
            &["-D", path_str(&self.data())?, "-m", "fast", "-w", "stop"],
        )
    }

    /// Kills the server as a crash would: SIGKILL to the postmaster and
    /// every process it started; the next start runs crash recovery.
    pub fn kill(&self) -> Result<(), String> {
        let pid_file = self.data().join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or("postmaster.pid has no pid")?;
        let children = children_of(pid);
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        for c in children {
            // SAFETY: as above.
            unsafe { libc::kill(c, libc::SIGKILL) };
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The children are gone too once the shared memory is free; give
        // them the same time.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// Runs SQL in database `db` through `psql` on the cluster's socket
    /// and returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self.run(
            "psql",
            &[
                "-h",
                path_str(&self.dir.join("sock"))?,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<Output, String> {
        let exe = self.bin.join(prog);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))
    }

    fn run_ok(&self, prog: &str, args: &[&str]) -> Result<(), String> {
        let out = self.run(prog, args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{prog} failed ({}): {}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ))
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Ok(data) = path_str(&self.data())
            && self
                .run_ok("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"])
                .is_err()
        {
            // (also when no server was started: kill finds no pid then)
            let _ = self.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops and removes the clusters of processes that are gone (dropping
/// them does both). Only directories of the owner ours would have (the
/// `postgres` user as root, else us), not symbolic links: a directory
/// anyone else planted under that name, with a `postmaster.pid` naming
/// another process, is left alone (dropping it would signal that process,
/// as root).
fn sweep_orphans(bin: &Path, as_postgres: bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let Some(uid) = (if as_postgres {
        postgres_uid()
    } else {
        // SAFETY: geteuid(2) has no memory effects and cannot fail.
        Some(unsafe { libc::geteuid() })
    }) else {
        return;
    };
    for e in entries.flatten() {
        let ours = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours {
            continue;
        }
        let name = e.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix("quic-report-pg-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        drop(PgCluster {
            dir: e.path(),
            bin: bin.to_owned(),
            port: 0,
            password: String::new(),
            as_postgres,
        });
    }
}

/// The `postgres` user's uid, if there is one.
fn postgres_uid() -> Option<u32> {
    // SAFETY: passwd is plain data (integers and pointers): all zeroes is a
    // valid value, which getpwnam_r overwrites.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r(3) (reentrant: tests start clusters on several
    // threads) with a NUL-terminated name, an entry and a buffer that
    // outlive the call, and their true sizes.
    let rc = unsafe {
        libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(pw.pw_uid)
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("QUIC_REPORT_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| d.join("initdb").exists())
        .ok_or_else(|| {
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed: `make deps` \
             installs the postgresql package"
                .to_owned()
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Processes whose parent is `pid` (from /proc).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}
