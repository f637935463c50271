//! A throwaway PostgreSQL cluster for the database lease tests: `initdb` as the `postgres`
//! user into a temp dir (password authentication, the password in a file), `pg_ctl start` on
//! 127.0.0.1 with a free port and its socket in the temp dir, stopped and removed on drop.
//! The binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin. Where they
//! are missing (or we are not root) the test is skipped by hand and fails under CI=true.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{is_root, skip};

/// The superuser's password in the test clusters.
pub(crate) const PG_PASSWORD: &str = "lease-test-Pw-7d1c";
/// How many ports are tried when another process takes the free one first.
const PORT_ATTEMPTS: usize = 3;

/// A running cluster; see the module doc.
pub(crate) struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    pub(crate) port: u16,
    /// Server options beyond the port and socket (TLS).
    extra: String,
    /// Addresses it listens on besides 127.0.0.1 (comma-separated, each with a leading comma).
    also: String,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn pg_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    });
    on_path.or_else(|| {
        let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

/// The uid and gid of `user` from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl PgCluster {
    /// Starts a cluster, or skips `test` (a failure under CI) and returns None.
    pub(crate) fn start(test: &str) -> Option<PgCluster> {
        PgCluster::start_with(test, false, &[])
    }

    /// Starts a cluster that also listens on `addrs` (addresses of this host, such as the
    /// root end of a veth pair to a network namespace) and accepts password logins there.
    pub(crate) fn start_on(test: &str, addrs: &[std::net::Ipv4Addr]) -> Option<PgCluster> {
        PgCluster::start_with(test, false, addrs)
    }

    /// Starts a cluster that also accepts TLS, with a certificate for `127.0.0.1` from a CA
    /// made by `artemis-sync certs init`; returns it and the CA file.
    pub(crate) fn start_tls(test: &str) -> Option<(PgCluster, PathBuf)> {
        let c = PgCluster::start_with(test, true, &[])?;
        let ca = c.dir.path().join("tls/ca.pem");
        Some((c, ca))
    }

    fn start_with(test: &str, tls: bool, addrs: &[std::net::Ipv4Addr]) -> Option<PgCluster> {
        if !is_root() {
            skip(
                test,
                "initdb must run as the postgres user, which needs root",
            );
            return None;
        }
        let Some(bin) = pg_bin_dir() else {
            skip(
                test,
                "PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)",
            );
            return None;
        };
        let Some((uid, gid)) = user_ids("postgres") else {
            skip(
                test,
                "there is no postgres user (apt-get install postgresql)",
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("artemis-pg")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let mut c = PgCluster {
            dir,
            bin,
            uid,
            gid,
            port: 0,
            extra: String::new(),
            also: addrs.iter().map(|a| format!(",{a}")).collect(),
        };
        if tls {
            c.extra = c.make_certs();
        }
        let pw = c.dir.path().join("pw");
        fs::write(&pw, PG_PASSWORD).unwrap();
        std::os::unix::fs::chown(&pw, Some(uid), Some(gid)).unwrap();
        let data = c.data();
        let out = c
            .as_postgres("initdb")
            .args(["-A", "scram-sha-256", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut hba = fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .unwrap();
        for a in addrs {
            std::io::Write::write_all(
                &mut hba,
                format!("host all all {a}/24 scram-sha-256\n").as_bytes(),
            )
            .unwrap();
        }
        drop(hba);
        for _ in 0..PORT_ATTEMPTS {
            c.port = free_port();
            if c.pg_ctl_start() {
                return Some(c);
            }
        }
        panic!("the cluster did not start:\n{}", c.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.uid(self.uid)
            .gid(self.gid)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// A CA and a server certificate for 127.0.0.1 in `<dir>/tls`, readable by the server;
    /// returns the server options that turn TLS on.
    fn make_certs(&self) -> String {
        let tls = self.dir.path().join("tls");
        let out = crate::util::main_cmd()
            .args(["certs", "init", "--hosts", "127.0.0.1", "--dir"])
            .arg(&tls)
            .output()
            .expect("run certs init");
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in ["", "ca.pem", "127.0.0.1.pem", "127.0.0.1.key"] {
            std::os::unix::fs::chown(tls.join(f), Some(self.uid), Some(self.gid)).unwrap();
        }
        format!(
            "-c ssl=on -c log_connections=on -c ssl_cert_file={} -c ssl_key_file={}",
            tls.join("127.0.0.1.pem").display(),
            tls.join("127.0.0.1.key").display()
        )
    }

    /// The server's log so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn pg_ctl_start(&self) -> bool {
        let opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1{} -c fsync=off {}",
            self.dir.path().display(),
            self.port,
            self.also,
            self.extra
        );
        self.as_postgres("pg_ctl")
            .args(["start", "-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-o", &opts])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl")
            .success()
    }

    /// Stops the server (`-m fast`: sessions are cut, as when the database goes down).
    pub(crate) fn stop(&self) {
        let ok = self
            .as_postgres("pg_ctl")
            .args(["stop", "-w", "-t", "30", "-m", "fast", "-D"])
            .arg(self.data())
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl")
            .success();
        assert!(ok, "pg_ctl stop failed:\n{}", self.log());
    }

    /// Starts the stopped server again on its port.
    pub(crate) fn restart(&self) {
        assert!(self.pg_ctl_start(), "pg_ctl start failed:\n{}", self.log());
    }

    /// Writes a DSN reaching a cluster on 127.0.0.1:`port` (or a proxy to it) with the
    /// password to `path`, as the agent wants it: root-owned, mode 0600.
    pub(crate) fn write_dsn_on(path: &Path, port: u16) {
        PgCluster::write_dsn_with(path, &format!("host=127.0.0.1 port={port}"));
    }

    /// Writes a DSN of `host_port_tls` (host, port, TLS keys) with the user and password.
    pub(crate) fn write_dsn_with(path: &Path, host_port_tls: &str) {
        let dsn = format!("{host_port_tls} user=postgres password='{PG_PASSWORD}' dbname=postgres");
        fs::write(path, dsn).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .args(["stop", "-w", "-t", "30", "-m", "immediate", "-D"])
            .arg(self.data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// How long a proxy thread blocks in one read or accept before looking at its flags.
const PROXY_TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// A TCP proxy on 127.0.0.1 to the database that the test can cut: one agent reaches the
/// database through it, so the database becomes unreachable from that agent only. Cut, it
/// closes every connection and closes each new one at once (as a firewall's reset would).
pub(crate) struct CutProxy {
    pub(crate) port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    pub(crate) fn start(target: u16) -> CutProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) if !c.load(Ordering::Relaxed) => {
                        if let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) {
                            pump(
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                &c,
                                &s,
                                None,
                            );
                            pump(server, client, &c, &s, None);
                        }
                    }
                    Ok(_) => {} // cut: dropped at once
                    Err(_) => std::thread::sleep(PROXY_TICK),
                }
            }
        });
        CutProxy { port, cut, stop }
    }

    /// Cuts (`true`) or restores (`false`) the path.
    pub(crate) fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.set_cut(true);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One read from a socket with a read timeout: `Some(n)` bytes (0: nothing within the
/// timeout), `None` at its end or on an error.
pub(crate) fn read_step(from: &mut std::net::TcpStream, buf: &mut [u8]) -> Option<usize> {
    use std::io::{ErrorKind, Read};
    match from.read(buf) {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Some(0),
        Err(_) => None,
    }
}

/// Copies `from` to `to` on a thread until either closes, or the proxy is cut or stopped;
/// with `bytes_per_s`, at about that rate.
pub(crate) fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    bytes_per_s: Option<u64>,
) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let (cut, stop) = (cut.clone(), stop.clone());
    from.set_read_timeout(Some(PROXY_TICK)).unwrap();
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut total = 0u64;
        let mut buf = [0u8; 16 * 1024];
        while !cut.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            match read_step(&mut from, &mut buf) {
                Some(0) => {}
                Some(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n as u64;
                    if let Some(rate) = bytes_per_s {
                        let due = std::time::Duration::from_millis(total * 1000 / rate);
                        std::thread::sleep(due.saturating_sub(started.elapsed()));
                    }
                }
                None => break,
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
