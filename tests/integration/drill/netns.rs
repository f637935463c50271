//! Two "VMs" as network namespaces: `a` (first hot) and `b` (first cold), joined by a veth
//! pair for the agents' replication link, and each joined to the root namespace by a veth
//! pair of its own, over which it reaches the PostgreSQL witness listening on the root ends.
//! Names carry the process id and a counter, so two drills never collide; dropping the
//! topology deletes both namespaces (and with them their veths and nftables tables).

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::util::{run, run_with_input};

/// Counts the topologies made by this process (part of their names and subnets).
static NEXT: AtomicU32 = AtomicU32::new(0);
/// The replication port each agent listens on, inside its own namespace.
pub(crate) const REPL_PORT: u16 = 7400;

/// One VM: its namespace, the end of the agents' link in it, and its end towards the root.
pub(crate) struct Vm {
    /// `ip netns` name.
    pub(crate) name: String,
    /// The veth of the agents' link in this namespace.
    pub(crate) link_dev: String,
    /// The veth towards the root namespace (the database) in this namespace.
    pub(crate) db_dev: String,
    /// This VM's address on the agents' link.
    pub(crate) link_ip: Ipv4Addr,
    /// The root namespace's address on this VM's database link (the database listens there).
    pub(crate) db_ip: Ipv4Addr,
}

impl Vm {
    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub(crate) fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Where its agent listens.
    pub(crate) fn repl_addr(&self) -> SocketAddr {
        SocketAddr::from((self.link_ip, REPL_PORT))
    }
}

/// The two namespaces and their links; see the module doc.
pub(crate) struct Topology {
    pub(crate) a: Vm,
    pub(crate) b: Vm,
}

/// Runs `ip <args>` and asserts it succeeded.
#[track_caller]
pub(crate) fn ip(args: &str) {
    let out = run(Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null()));
    assert!(out.status.success(), "{out}");
}

impl Topology {
    /// Creates both namespaces and the three veth pairs, addresses up.
    pub(crate) fn new() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // the root namespace sees 10.<s>.<t>.0/24 per topology: distinct per process and drill
        let (s, t) = (
            u8::try_from(100 + pid % 100).expect("below 200"),
            u8::try_from((pid / 100 * 16 + n) % 250).expect("below 250"),
        );
        let vm = |side: char, host: u8| Vm {
            name: format!("artemis-drill-{pid}-{n}-{side}"),
            link_dev: format!("dl{side}{pid}{n}"),
            db_dev: format!("dd{side}{pid}{n}"),
            link_ip: Ipv4Addr::new(192, 168, 77, host),
            db_ip: Ipv4Addr::new(10, s, t, if side == 'a' { 1 } else { 5 }),
        };
        let topo = Topology {
            a: vm('a', 1),
            b: vm('b', 2),
        };
        for v in [&topo.a, &topo.b] {
            ip(&format!("netns add {}", v.name));
        }
        let (a, b) = (&topo.a, &topo.b);
        ip(&format!(
            "link add {} netns {} type veth peer name {} netns {}",
            a.link_dev, a.name, b.link_dev, b.name
        ));
        for v in [a, b] {
            let root_dev = format!("dr{}", &v.db_dev[2..]);
            ip(&format!(
                "link add {root_dev} type veth peer name {} netns {}",
                v.db_dev, v.name
            ));
            ip(&format!("addr add {}/30 dev {root_dev}", v.db_ip));
            ip(&format!("link set {root_dev} up"));
            let o = v.db_ip.octets();
            let inner = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1);
            for cmd in [
                format!("addr add {inner}/30 dev {}", v.db_dev),
                format!("link set {} up", v.db_dev),
                format!("addr add {}/24 dev {}", v.link_ip, v.link_dev),
                format!("link set {} up", v.link_dev),
                "link set lo up".to_owned(),
            ] {
                ip(&format!("-n {} {cmd}", v.name));
            }
        }
        topo
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for v in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", &v.name])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("dr{}", &v.db_dev[2..])])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a thread that entered the network namespace at `ns` first: sockets it makes
/// (and threads it spawns) live in that namespace.
pub(crate) fn in_ns<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}

/// Moves the calling thread into the network namespace at `ns`.
pub(crate) fn enter(ns: &Path) {
    let f = File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    // SAFETY: setns with an open namespace descriptor changes only this thread's network
    // namespace; the descriptor stays open for the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        ns.display(),
        std::io::Error::last_os_error()
    );
}

/// A listener bound to `addr` inside the namespace at `ns`.
pub(crate) fn listener_in(ns: &Path, addr: SocketAddr) -> TcpListener {
    in_ns(ns, || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.display()))
    })
}

/// `cmd` (program, arguments, environment changes) run by `nsenter --net=<ns>`, which only
/// enters the network namespace (unlike `ip netns exec`, no new mount namespace: the FUSE
/// mount stays visible) and execs the program under the same pid.
pub(crate) fn in_netns(cmd: &Command, ns: &Path) -> Command {
    let mut c = Command::new("nsenter");
    let mut net = OsString::from("--net=");
    net.push(ns);
    c.arg(net).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Runs `program args` inside the namespace at `ns` with `stdin` as its input; asserts it
/// succeeded and returns its output.
#[track_caller]
pub(crate) fn run_in(ns: &Path, program: &str, args: &[&str], stdin: &str) -> String {
    let mut c = in_netns(Command::new(program).args(args), ns);
    let what = format!("{c:?}");
    let out = run_with_input(&mut c, stdin);
    assert!(
        out.status.success(),
        "{what}: {}\n{stdin}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
