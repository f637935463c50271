//! The system calls the mount logic depends on, behind one trait so that the retry, probe and
//! idempotence logic can be tested with a scripted fake, and the few direct libc calls
//! (`statvfs`, `geteuid`) in one place with their safety arguments.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The environment variable that replaces the mount program (`mount`), for tests and for
/// distributions that keep it elsewhere.
pub const MOUNT_PROGRAM_ENV: &str = "ARTEMIS_SYNC_MOUNT_PROGRAM";
/// The program run when [`MOUNT_PROGRAM_ENV`] is not set, found through `PATH`.
pub const DEFAULT_MOUNT_PROGRAM: &str = "mount";
/// Where the kernel lists this process's mounts.
pub const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// What a finished command reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The exit code, or `None` when killed by a signal.
    pub code: Option<i32>,
    /// What it wrote to standard error.
    pub stderr: String,
}

impl CommandOutcome {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The operations the mount logic performs on the system.
pub trait Sys {
    /// Runs the mount program with `args`, standard input closed, and waits for it.
    fn run_mount(&self, args: &[OsString]) -> io::Result<CommandOutcome>;
    /// Resolves `host` and opens a TCP connection to `port` on any of its addresses.
    fn probe(&self, host: &str, port: u16, timeout: Duration) -> io::Result<()>;
    /// The text of `/proc/self/mountinfo`.
    fn mountinfo(&self) -> io::Result<String>;
    /// Waits `d` between attempts.
    fn sleep(&self, d: Duration);
    /// The program [`Sys::run_mount`] runs, for messages and `-f`.
    fn mount_program(&self) -> OsString;
}

/// The real system.
#[derive(Debug, Clone)]
pub struct RealSys {
    mount_program: OsString,
}

impl RealSys {
    /// The real system, with the mount program from [`MOUNT_PROGRAM_ENV`] or `mount`.
    pub fn from_env() -> Self {
        let mount_program = std::env::var_os(MOUNT_PROGRAM_ENV)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_MOUNT_PROGRAM.into());
        RealSys { mount_program }
    }
}

impl Sys for RealSys {
    fn run_mount(&self, args: &[OsString]) -> io::Result<CommandOutcome> {
        let out = Command::new(&self.mount_program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()?;
        Ok(CommandOutcome {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        })
    }

    fn probe(&self, host: &str, port: u16, timeout: Duration) -> io::Result<()> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    }

    fn mountinfo(&self) -> io::Result<String> {
        read_mountinfo()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn mount_program(&self) -> OsString {
        self.mount_program.clone()
    }
}

/// The text of [`MOUNTINFO_PATH`]. The kernel escapes only white space and `\` in paths, so
/// one mount point anywhere on the host whose name is not UTF-8 (a USB stick's label, a
/// container's layer) makes the file no UTF-8 text: its stray bytes are read as U+FFFD rather
/// than refusing the whole table, and with it the share's mount, doctor and the agent.
pub fn read_mountinfo() -> io::Result<String> {
    Ok(String::from_utf8_lossy(&std::fs::read(MOUNTINFO_PATH)?).into_owned())
}

/// Milliseconds since the Unix epoch (for reports only: decisions use monotonic clocks).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds on the monotonic clock since this process first asked: for an age that a
/// step of the wall clock must not change.
pub fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The width in columns of the terminal on `fd`; `None` if it is not a terminal.
pub fn terminal_columns(fd: std::os::fd::BorrowedFd<'_>) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: winsize is plain old data; all-zero bytes are a valid value of it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor for the borrow's lifetime, and TIOCGWINSZ writes one
    // winsize into `ws`, a valid, writable one.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// Replaces `path` with `data` atomically: a temporary file beside it (`.<name>.tmp.<pid>`),
/// fsynced, renamed over it, and the directory fsynced, so a reader sees the old content or the
/// new, never a mix, even after a crash. The temporary is removed on failure.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Bytes an unprivileged user may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value of it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid, writable statvfs that
    // outlives the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether this process runs with an effective uid of root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Quotes `arg` for a shell when it holds anything but plain characters, for printing the
/// commands that `-f` would run.
pub fn shell_quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_reads_the_filesystem_and_names_errors() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        assert_eq!(
            free_bytes(Path::new("/no/such/dir")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(
            shell_quote(OsStr::new("nfsvers=4.1,hard")),
            "nfsvers=4.1,hard"
        );
        assert_eq!(shell_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn probe_connects_and_reports_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sys = RealSys::from_env();
        sys.probe("127.0.0.1", port, Duration::from_secs(2))
            .unwrap();
        drop(listener);
        let err = sys
            .probe("127.0.0.1", port, Duration::from_secs(2))
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}
