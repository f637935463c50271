//! Taking over a listening TCP socket from the parent process, as systemd's socket activation
//! hands it over (`sd_listen_fds(3)`): when `LISTEN_FDS` is set and `LISTEN_PID` is this
//! process's pid, file descriptor 3 is a socket the parent already bound and listens on.
//!
//! The replicated agent uses it for `[replication] listen`: with a systemd `.socket` unit
//! (`ListenStream=` the same address, `Service=artemis-sync.service`) the port is bound by
//! systemd before the agent starts and stays bound across agent restarts, and a test or the
//! benchmark binds port 0, keeps the socket, and hands it to the agent, so that no other
//! process can take the port between choosing it and the agent binding it. The socket must be
//! a listening IPv4 or IPv6 stream socket bound to the configured address (a configured port 0
//! accepts any port); anything else stops the agent with an error saying what differs. Without
//! those variables the agent binds the address itself.
//!
//! The variables are left in the environment (removing them would race with other threads
//! reading it); the node the agent starts inherits them, but `LISTEN_PID` names the agent, not
//! the node, and fd 3 is made close-on-exec, so the node neither sees nor takes the socket.

use std::ffi::OsStr;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first (and here only) file descriptor handed over, as `sd_listen_fds(3)` defines it.
pub const LISTEN_FDS_START: RawFd = 3;
/// The variable that says how many descriptors were handed over.
pub const LISTEN_FDS_ENV: &str = "LISTEN_FDS";
/// The variable that names the process they were handed to.
pub const LISTEN_PID_ENV: &str = "LISTEN_PID";

/// Set once fd 3 was taken, so that it is never owned twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why a socket handed over cannot serve as the listener, naming the descriptor.
// The messages name the config section `[replication]`, which is not a doc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ListenFdsError {
    /// LISTEN_FDS={0:?} is not a number of file descriptors
    BadCount(String),
    /// LISTEN_FDS={0}: the agent takes exactly one listening socket (fd 3), for [replication] listen
    Count(usize),
    /// fd 3 was already taken over by this process
    AlreadyTaken,
    /// the socket handed over as fd {fd} (LISTEN_FDS): {source}
    Io {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    /// fd {0} handed over (LISTEN_FDS) is not a socket
    NotSocket(RawFd),
    /// the socket handed over as fd {0} (LISTEN_FDS) is not a TCP socket (an IPv4 or IPv6 stream socket is needed)
    NotTcp(RawFd),
    /// the socket handed over as fd {0} (LISTEN_FDS) is bound but not listening
    NotListening(RawFd),
    /// the socket handed over as fd {fd} (LISTEN_FDS) is bound to {bound}, but [replication] listen is {expected}
    Mismatch {
        fd: RawFd,
        bound: SocketAddr,
        expected: SocketAddr,
    },
}

/// The listener handed over to this process, checked against `expected`; `None` when none
/// was handed over (the caller binds `expected` itself).
pub fn take_listener(expected: SocketAddr) -> Result<Option<TcpListener>, ListenFdsError> {
    let var = |name| std::env::var(name).ok();
    let Some(fd) = handed_over(
        var(LISTEN_PID_ENV).as_deref(),
        var(LISTEN_FDS_ENV).as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(ListenFdsError::AlreadyTaken);
    }
    // SAFETY: LISTEN_PID names this process, so its parent left fd 3 open for it to own (the
    // socket-activation protocol); nothing else in this process opens or uses fd 3 by number,
    // and TAKEN makes sure it is wrapped only once. If fd 3 is not open, the checks in
    // `adopt` fail with EBADF before anything reads or writes through it, and dropping the
    // OwnedFd then closes nothing that belongs to someone else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    adopt(owned, expected).map(Some)
}

/// Which descriptor was handed over to the process `our_pid`, from the values of
/// `LISTEN_PID` and `LISTEN_FDS`.
fn handed_over(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<RawFd>, ListenFdsError> {
    let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        return Ok(None); // meant for another process (our parent, before it exec'd us)
    }
    match count.trim().parse::<usize>() {
        Ok(0) => Ok(None),
        Ok(1) => Ok(Some(LISTEN_FDS_START)),
        Ok(n) => Err(ListenFdsError::Count(n)),
        Err(_) => Err(ListenFdsError::BadCount(count.to_owned())),
    }
}

/// Checks that `fd` is a listening TCP socket bound to `expected` (any port if `expected`'s
/// is 0), makes it close-on-exec, and returns it as a listener.
pub fn adopt(fd: OwnedFd, expected: SocketAddr) -> Result<TcpListener, ListenFdsError> {
    let raw = fd.as_raw_fd();
    let io = |source| ListenFdsError::Io { fd: raw, source };
    if !is_socket(&fd).map_err(io)? {
        return Err(ListenFdsError::NotSocket(raw));
    }
    let domain = sockopt(&fd, libc::SO_DOMAIN).map_err(io)?;
    if sockopt(&fd, libc::SO_TYPE).map_err(io)? != libc::SOCK_STREAM
        || (domain != libc::AF_INET && domain != libc::AF_INET6)
    {
        return Err(ListenFdsError::NotTcp(raw));
    }
    if sockopt(&fd, libc::SO_ACCEPTCONN).map_err(io)? == 0 {
        return Err(ListenFdsError::NotListening(raw));
    }
    set_cloexec(&fd).map_err(io)?;
    let listener = TcpListener::from(fd);
    let bound = listener.local_addr().map_err(io)?;
    let same =
        bound.ip() == expected.ip() && (expected.port() == 0 || bound.port() == expected.port());
    if !same {
        return Err(ListenFdsError::Mismatch {
            fd: raw,
            bound,
            expected,
        });
    }
    Ok(listener)
}

fn is_socket(fd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor we own, and `st` is a valid, writable `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// An integer socket option at `SOL_SOCKET`.
fn sockopt(fd: &OwnedFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>())
        .expect("the size of a C int fits a socklen_t");
    // SAFETY: `fd` is an open descriptor we own; `value` and `len` are valid, writable, and
    // `len` holds the size of `value`, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on a descriptor we own changes only that descriptor's flags.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The parent's side: a command that runs `program` with `listener` as its fd 3 and
/// `LISTEN_FDS=1`, `LISTEN_PID=<its pid>`. It goes through `/bin/sh`, which sets `LISTEN_PID` to
/// its own pid and `exec`s `program` (keeping the pid); add `program`'s arguments to it. The
/// listener stays open in the caller, so a restarted agent gets the same socket again.
pub fn command_with_listener(program: impl AsRef<OsStr>, listener: &TcpListener) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "export {LISTEN_PID_ENV}=$$ {LISTEN_FDS_ENV}=1; exec \"$0\" \"$@\""
        ))
        .arg(program);
    let fd = listener.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec; it calls only dup2 and
    // fcntl, which are async-signal-safe, allocates nothing, and captures a plain integer.
    // `fd` is open in the child (it was open in the parent when the child was forked).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 leaves the new descriptor without FD_CLOEXEC; when `fd` already is 3,
            // dup2 does nothing, so clear the flag by hand
            let rc = if fd == LISTEN_FDS_START {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, LISTEN_FDS_START)
            };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::unix::net::UnixListener;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn only_a_count_for_this_pid_hands_a_socket_over() {
        assert_eq!(handed_over(None, None, 10).unwrap(), None);
        assert_eq!(handed_over(Some("10"), None, 10).unwrap(), None);
        assert_eq!(handed_over(Some("11"), Some("1"), 10).unwrap(), None);
        assert_eq!(handed_over(Some("x"), Some("1"), 10).unwrap(), None);
        assert_eq!(handed_over(Some("10"), Some("0"), 10).unwrap(), None);
        assert_eq!(handed_over(Some("10"), Some("1"), 10).unwrap(), Some(3));
        let err = handed_over(Some("10"), Some("2"), 10).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        let err = handed_over(Some("10"), Some("one"), 10).unwrap_err();
        assert!(err.to_string().contains("\"one\""), "{err}");
    }

    #[test]
    fn a_listening_tcp_socket_on_the_configured_address_is_adopted() {
        let listener = TcpListener::bind(loopback(0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let adopted = adopt(OwnedFd::from(listener), addr).unwrap();
        assert_eq!(adopted.local_addr().unwrap(), addr);
        let flags = {
            // SAFETY: F_GETFD on a descriptor we own reads its flags.
            unsafe { libc::fcntl(adopted.as_raw_fd(), libc::F_GETFD) }
        };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let any_port = TcpListener::bind(loopback(0)).unwrap();
        adopt(OwnedFd::from(any_port), loopback(0)).unwrap();
    }

    #[test]
    fn what_differs_is_named() {
        let listener = TcpListener::bind(loopback(0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let other = loopback(addr.port().wrapping_add(1).max(1));
        let err = adopt(OwnedFd::from(listener), other)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("bound to {addr}")) && err.contains(&other.to_string()),
            "{err}"
        );
        let udp = UdpSocket::bind(loopback(0)).unwrap();
        let err = adopt(OwnedFd::from(udp), addr).unwrap_err();
        assert!(matches!(err, ListenFdsError::NotTcp(_)), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("s")).unwrap();
        let err = adopt(OwnedFd::from(unix), addr).unwrap_err();
        assert!(matches!(err, ListenFdsError::NotTcp(_)), "{err}");
        let server = TcpListener::bind(loopback(0)).unwrap();
        let stream = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let err = adopt(OwnedFd::from(stream), addr).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = adopt(OwnedFd::from(file), addr).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
    }

    #[test]
    fn the_child_gets_the_listener_as_fd_3_with_its_own_pid() {
        let listener = TcpListener::bind(loopback(0)).unwrap();
        let out = command_with_listener("/bin/sh", &listener)
            .arg("-c")
            .arg("echo $LISTEN_PID $$ $LISTEN_FDS; readlink /proc/$$/fd/3")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 4, "{text}");
        assert_eq!(words[0], words[1], "LISTEN_PID is the child's pid: {text}");
        assert_eq!(words[2], "1");
        assert!(words[3].starts_with("socket:["), "{text}");
    }
}
