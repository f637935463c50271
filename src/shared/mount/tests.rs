//! The mount's unit tests, against a scripted [`Sys`]: plans for every backend, refusals,
//! retries with their pauses, idempotence, `-f`, and the fstab line.

use super::run::Jitter;
use super::*;
use crate::sys::{CommandOutcome, Sys};
use std::cell::RefCell;
use std::ffi::OsString;
use std::io;

/// A scripted system: probe and mount results in order, and a record of every call.
#[derive(Default)]
struct FakeSys {
    probes: RefCell<Vec<io::Result<()>>>,
    mounts: RefCell<Vec<i32>>,
    mountinfo: RefCell<String>,
    /// mountinfo after the first successful mount
    mountinfo_after: String,
    calls: RefCell<Vec<String>>,
    slept: RefCell<Vec<Duration>>,
}

impl Sys for FakeSys {
    fn run_mount(&self, args: &[OsString]) -> io::Result<CommandOutcome> {
        let line = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        self.calls.borrow_mut().push(format!("mount {line}"));
        let code = self.mounts.borrow_mut().remove(0);
        if code == 0 {
            *self.mountinfo.borrow_mut() = self.mountinfo_after.clone();
        }
        Ok(CommandOutcome {
            code: Some(code),
            stderr: if code == 0 {
                String::new()
            } else {
                "mount.nfs4: Connection timed out".into()
            },
        })
    }
    fn probe(&self, host: &str, port: u16, _: Duration) -> io::Result<()> {
        self.calls.borrow_mut().push(format!("probe {host}:{port}"));
        self.probes.borrow_mut().remove(0)
    }
    fn mountinfo(&self) -> io::Result<String> {
        Ok(self.mountinfo.borrow().clone())
    }
    fn sleep(&self, d: Duration) {
        self.slept.borrow_mut().push(d);
    }
    fn mount_program(&self) -> OsString {
        "mount".into()
    }
}

const EFS_SPEC: &str = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/";

fn efs_request(dir: &Path, opts: &str) -> MountRequest {
    MountRequest::from_helper_args(EFS_SPEC, dir, &format!("backend=efs,{opts}")).unwrap()
}

fn args(plan: &MountPlan) -> String {
    plan.args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn efs_gets_the_amazon_efs_utils_options() {
    let p = plan(&efs_request(
        Path::new("/mnt/x"),
        "_netdev,nofail,x-systemd.mount-timeout=30",
    ))
    .unwrap();
    assert_eq!(
        args(&p),
        "-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport \
         fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /mnt/x"
    );
    assert_eq!(
        p.probe,
        Some(("fs-0123abcd.efs.eu-west-1.amazonaws.com".into(), 2049))
    );
}

#[test]
fn every_backend_translates_to_its_mount() {
    let cases = [
        ("azure-nfs", "acct.file.core.windows.net:/acct/corda", "", "-t nfs4 -o vers=4,minorversion=1,sec=sys,hard,timeo=600,retrans=2 acct.file.core.windows.net:/acct/corda /m"),
        ("nfs", "[fd00::5]:/export", "vers=4.2", "-t nfs4 -o hard,timeo=600,retrans=2,vers=4.2 [fd00::5]:/export /m"),
        ("cifs", "//srv/share", "uid=1000", "-t cifs -o serverino,uid=1000 //srv/share /m"),
        ("bind", "/srv/share", "", "--bind /srv/share /m"),
        ("efs", EFS_SPEC, "soft,timeo=30", "-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,retrans=2,noresvport,soft,timeo=30 fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /m"),
    ];
    for (backend, spec, user, want) in cases {
        let req = MountRequest::from_helper_args(
            spec,
            Path::new("/m"),
            &format!("backend={backend},{user}"),
        )
        .unwrap();
        assert_eq!(args(&plan(&req).unwrap()), want, "backend {backend}");
    }
}

#[test]
fn azure_smb_needs_a_credentials_file_and_never_a_password() {
    let req = MountRequest::from_helper_args(
        "//acct.file.core.windows.net/corda",
        Path::new("/m"),
        "backend=azure-smb",
    )
    .unwrap();
    let err = plan(&req).unwrap_err();
    assert!(
        err.to_string().contains("needs `credentials=<file>`"),
        "{err}"
    );
    assert_eq!(err.exit_code(), EXIT_USAGE);
    let req = MountRequest::from_helper_args(
        "//srv/share",
        Path::new("/m"),
        "backend=cifs,username=u,password=p",
    )
    .unwrap();
    let err = plan(&req).unwrap_err();
    assert!(err.to_string().contains("credentials file"), "{err}");
    let req = MountRequest::from_helper_args(
        "//srv/share",
        Path::new("/m"),
        "backend=cifs,credentials=/nonexistent/cred",
    )
    .unwrap();
    let err = plan(&req).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cred"), "{err}");
}

#[test]
fn helper_options_are_checked() {
    let bad =
        |opts: &str| MountRequest::from_helper_args(EFS_SPEC, Path::new("/m"), opts).unwrap_err();
    assert!(matches!(bad("hard"), MountError::NoBackend));
    assert!(bad("backend=gluster")
        .to_string()
        .contains("unknown backend `gluster`"));
    assert!(matches!(bad("backend=efs,sec=a=b"), MountError::Options(_)));
    assert!(bad("backend=efs,mount_attempts=lots")
        .to_string()
        .contains("mount_attempts=lots"));
    let req =
        MountRequest::from_helper_args(EFS_SPEC, Path::new("/m"), "backend=efs,nolock").unwrap();
    let err = plan(&req).unwrap_err();
    assert!(
        err.to_string().contains("nolock") && err.exit_code() == EXIT_USAGE,
        "{err}"
    );
    let req = MountRequest::from_helper_args("nfs-server", Path::new("/m"), "backend=nfs").unwrap();
    assert!(plan(&req).unwrap_err().to_string().contains("host:/path"));
    let req = MountRequest::from_helper_args("", Path::new("/m"), "backend=premounted").unwrap();
    assert!(matches!(plan(&req), Err(MountError::Premounted { .. })));
}

#[test]
fn retries_while_unreachable_then_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let sys = FakeSys {
        probes: RefCell::new(vec![
            Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
            Ok(()),
            Ok(()),
        ]),
        mounts: RefCell::new(vec![32, 0]),
        mountinfo_after: format!(
            "1 0 0:5 / {} rw - nfs4 {EFS_SPEC} rw,local_lock=none\n",
            d.display()
        ),
        ..Default::default()
    };
    let out = mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap();
    assert_eq!(out, MountOutcome::Mounted { attempts: 4 });
    let calls = sys.calls.borrow();
    assert_eq!(calls.iter().filter(|c| c.starts_with("probe")).count(), 4);
    assert_eq!(calls.iter().filter(|c| c.starts_with("mount")).count(), 2);
    // pauses grow by 1.5 from 1 s, each with at most 20% jitter
    let slept = sys.slept.borrow();
    assert_eq!(slept.len(), 3);
    for (i, base) in [1000u64, 1500, 2250].iter().enumerate() {
        let ms = u64::try_from(slept[i].as_millis()).unwrap();
        assert!(ms >= *base && ms <= base + base / 5, "pause {i}: {ms} ms");
    }
    // mounting again is a no-op
    assert_eq!(
        mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap(),
        MountOutcome::AlreadyMounted
    );
}

/// The share mounted on the mount point, then hidden by a later mount on its parent (a tmpfs
/// over `/var/lib/artemis-sync`): the mount point a lookup reaches is a directory of that
/// tmpfs, but the table's entry for the hidden share made the helper answer "already mounted"
/// (exit 0 at boot) and mount nothing, so the node's journal went to the tmpfs.
#[test]
fn issue2_a_share_hidden_by_a_mount_on_its_parent_is_not_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().canonicalize().unwrap();
    let d = parent.join("share");
    std::fs::create_dir(&d).unwrap();
    let hidden = format!(
        "1 0 8:1 / / rw - ext4 /dev/vda1 rw\n\
         30 1 0:50 / {} rw - nfs4 {EFS_SPEC} rw,local_lock=none\n\
         31 1 0:51 / {} rw - tmpfs tmpfs rw\n",
        d.display(),
        parent.display()
    );
    let sys = FakeSys {
        probes: RefCell::new(vec![Ok(())]),
        mounts: RefCell::new(vec![0]),
        mountinfo: RefCell::new(hidden.clone()),
        mountinfo_after: format!(
            "{hidden}32 31 0:52 / {} rw - nfs4 {EFS_SPEC} rw,local_lock=none\n",
            d.display()
        ),
        ..Default::default()
    };
    let out = mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap();
    assert_eq!(out, MountOutcome::Mounted { attempts: 1 });
    assert_eq!(sys.calls.borrow().len(), 2, "{:?}", sys.calls.borrow());
    // once mounted on the tmpfs's directory, it is the one a lookup reaches
    assert_eq!(
        mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap(),
        MountOutcome::AlreadyMounted
    );
}

#[test]
fn gives_up_after_the_bounded_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let sys = FakeSys {
        probes: RefCell::new(
            (0..3)
                .map(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
                .collect(),
        ),
        ..Default::default()
    };
    let err = mount(
        &sys,
        &efs_request(dir.path(), "mount_attempts=3"),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_MOUNT_FAILURE);
    let msg = err.to_string();
    assert!(
        msg.contains("after 3 attempt(s)") && msg.contains("port 2049 is not reachable"),
        "{msg}"
    );
    assert_eq!(sys.slept.borrow().len(), 2);
}

#[test]
fn another_source_on_the_mount_point_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let sys = FakeSys {
        mountinfo: RefCell::new(format!("1 0 0:5 / {} rw - nfs4 other:/x rw\n", d.display())),
        ..Default::default()
    };
    let err = mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("already mounted from `other:/x`"),
        "{err}"
    );
    assert!(sys.calls.borrow().is_empty(), "nothing was run");
}

#[test]
fn fake_prints_and_runs_nothing() {
    let sys = FakeSys::default();
    let mut req = efs_request(Path::new("/does/not/exist"), "");
    req.fake = true;
    let mut out = Vec::new();
    mount(&sys, &req, &mut out).unwrap();
    let printed = String::from_utf8(out).unwrap();
    assert!(
        printed.starts_with("mount -t nfs4 -o nfsvers=4.1,"),
        "{printed}"
    );
    assert!(sys.calls.borrow().is_empty());
}

#[test]
fn missing_mount_point_is_named() {
    let err = mount(
        &FakeSys::default(),
        &efs_request(Path::new("/no/such/dir"), ""),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
    assert_eq!(err.exit_code(), EXIT_MOUNT_FAILURE);
}

#[test]
fn backoff_is_bounded() {
    let b = Backoff::new(8, 20_000);
    assert_eq!(b.base_delay_ms(1), 1000);
    assert_eq!(b.base_delay_ms(20), 20_000);
    assert!(b.total_ms() < crate::config::DEFAULT_MOUNT_TIMEOUT_S * 1000);
    assert_eq!(Backoff::new(1, 20_000).total_ms(), 0);
    // the same sum as pause by pause, however the cap falls
    for (attempts, max) in [
        (2, 20_000),
        (8, 20_000),
        (30, 5_000),
        (5, 500),
        (12, 1_000_000),
    ] {
        let b = Backoff::new(attempts, max);
        let one_by_one: u64 = (1..attempts).map(|n| b.base_delay_ms(n) * 12 / 10).sum();
        assert!(
            b.total_ms().abs_diff(one_by_one) <= u64::from(attempts),
            "{b:?}"
        );
    }
    // a huge number of attempts is summed at once (it took seconds) and saturates
    let started = std::time::Instant::now();
    assert_eq!(Backoff::new(u32::MAX, u64::MAX).total_ms(), u64::MAX);
    let huge = Backoff::new(u32::MAX, 20_000).total_ms();
    assert!(huge > 20_000 * u64::from(u32::MAX), "{huge}");
    assert!(started.elapsed() < Duration::from_millis(100));
    let mut j = Jitter::seeded();
    assert!((0..1000)
        .map(|_| j.next_unit())
        .all(|u| (0.0..1.0).contains(&u)));
}

#[test]
fn fstab_line_carries_the_helper_type_and_escapes_spaces() {
    let text = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "efs"
source = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/"
mount_point = "/var/lib/artemis sync"
options = "timeo=300"
mount_attempts = 5
"#;
    let config = Config::from_toml(Path::new("t.toml"), text).unwrap();
    assert_eq!(
        fstab_line(&config).unwrap(),
        "fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /var/lib/artemis\\040sync artemis-sync \
         backend=efs,_netdev,nofail,x-systemd.mount-timeout=180,mount_attempts=5,timeo=300 0 0"
    );
    // what mount(8) passes back from that line turns into the same request
    let req = MountRequest::from_helper_args(
        EFS_SPEC,
        Path::new("/m"),
        "backend=efs,_netdev,nofail,mount_attempts=5,timeo=300",
    )
    .unwrap();
    assert_eq!(req.backoff.attempts, 5);
    assert_eq!(req.options.to_string(), "timeo=300");
}

/// mount.cifs reads `username=user%password` (and `user=dom/user%password`) as a password
/// (mount.cifs(8), parse_username in cifs-utils): the check for `password=` missed it, so the
/// key went on the mount program's command line (ps, /proc/*/cmdline) and in -v / -f output.
#[test]
fn issue2_a_password_inside_username_is_refused() {
    let req = MountRequest::from_helper_args(
        "//srv/share",
        Path::new("/m"),
        "backend=cifs,username=acct%S3cretKey",
    )
    .unwrap();
    let p = plan(&req);
    assert!(
        p.is_err(),
        "the password reaches argv: {}",
        args(&p.unwrap())
    );
}

/// Before Linux 5.11 the cifs client reads `nolock` as `nobrl` (connect.c: `{ Opt_nobrl,
/// "nolock" }`; RHEL 8's 4.18, Ubuntu 20.04's 5.4): byte-range locks stay on the VM. The
/// helper refused `nobrl` on azure-smb but mounted `nolock`.
#[test]
fn issue3_cifs_nolock_is_refused_like_nobrl() {
    let cred = tempfile::NamedTempFile::new().unwrap();
    std::fs::set_permissions(
        cred.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let req = MountRequest::from_helper_args(
        "//acct.file.core.windows.net/corda",
        Path::new("/m"),
        &format!(
            "backend=azure-smb,credentials={},nolock",
            cred.path().display()
        ),
    )
    .unwrap();
    let p = plan(&req);
    assert!(
        p.is_err(),
        "cifs mount with nolock (= nobrl on kernels < 5.11) accepted: {}",
        args(&p.unwrap())
    );
}

/// `user=` is mount.cifs' short name for `username=` (the config's check for a password in a
/// user name covers both), but the helper dropped every `user` option as mount(8)'s userspace
/// flag: `options = "user=acct"` mounted as acct by `artemis-sync mount` and without a user
/// name from the fstab line at boot.
#[test]
fn cifs_user_name_from_the_fstab_line_reaches_the_mount() {
    let text = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "cifs"
source = "//srv/share"
options = "user=acct,uid=1000"
"#;
    let config = Config::from_toml(Path::new("t.toml"), text).unwrap();
    let line = fstab_line(&config).unwrap();
    let field: Vec<&str> = line.split(' ').collect();
    let boot = MountRequest::from_helper_args(field[0], Path::new(field[1]), field[3]).unwrap();
    let by_hand = MountRequest::from_config(&config);
    assert_eq!(args(&plan(&boot).unwrap()), args(&plan(&by_hand).unwrap()));
    assert!(args(&plan(&boot).unwrap()).contains("user=acct"));
    // mount(8)'s own `user` flag is still not passed on
    let req = MountRequest::from_helper_args(
        "//srv/share",
        Path::new("/m"),
        "backend=cifs,user,users,uid=1",
    )
    .unwrap();
    assert_eq!(req.options.to_string(), "uid=1");
}

/// `mount -o remount,ro` of an fstab entry reaches the helper as `-o ro,remount,backend=...`:
/// the share mounted there gets its options changed, by one run of the mount program with
/// `remount` first (no probe, no retry); it was once reported done with nothing changed.
#[test]
fn remount_changes_the_mounted_share_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let mounted = format!("1 0 0:5 / {} rw - nfs4 {EFS_SPEC} rw\n", d.display());
    let sys = FakeSys {
        mounts: RefCell::new(vec![0]),
        mountinfo: RefCell::new(mounted.clone()),
        mountinfo_after: mounted,
        ..Default::default()
    };
    let req =
        MountRequest::from_helper_args(EFS_SPEC, &d, "ro,remount,backend=efs,_netdev").unwrap();
    assert!(req.remount);
    let out = mount(&sys, &req, &mut Vec::new()).unwrap();
    assert_eq!(out, MountOutcome::Remounted);
    let calls = sys.calls.borrow();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("mount -t nfs4 -o remount,nfsvers=4.1,") && calls[0].contains(",ro "),
        "{calls:?}"
    );
    assert!(
        calls[0].ends_with(&format!("{EFS_SPEC} {}", d.display())),
        "{calls:?}"
    );
}

/// A remount where the share is not mounted is an error naming both, and mounts nothing.
#[test]
fn remount_of_what_is_not_mounted_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sys = FakeSys::default();
    let req = efs_request(dir.path(), "remount,ro");
    let err = mount(&sys, &req, &mut Vec::new()).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_MOUNT_FAILURE);
    let msg = err.to_string();
    assert!(
        msg.contains("cannot remount")
            && msg.contains(EFS_SPEC)
            && msg.contains("not mounted there"),
        "{msg}"
    );
    assert!(sys.calls.borrow().is_empty(), "{:?}", sys.calls.borrow());
}

/// Another source mounted there is refused as for a mount; a mount program that fails the
/// remount fails it after one attempt, with no pause.
#[test]
fn remount_of_another_source_or_a_failing_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let sys = FakeSys {
        mountinfo: RefCell::new(format!("1 0 0:5 / {} rw - nfs4 other:/x rw\n", d.display())),
        ..Default::default()
    };
    let err = mount(&sys, &efs_request(&d, "remount"), &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("already mounted from `other:/x`"),
        "{err}"
    );
    assert!(sys.calls.borrow().is_empty());

    let sys = FakeSys {
        mounts: RefCell::new(vec![32, 0]),
        mountinfo: RefCell::new(format!(
            "1 0 0:5 / {} rw - nfs4 {EFS_SPEC} rw\n",
            d.display()
        )),
        ..Default::default()
    };
    let err = mount(&sys, &efs_request(&d, "remount,ro"), &mut Vec::new()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("after 1 attempt(s)"), "{msg}");
    assert_eq!(sys.calls.borrow().len(), 1);
    assert!(sys.slept.borrow().is_empty());
}

/// A source whose host starts with `-` passed the check of its form, and the helper put it on
/// mount(8)'s command line, where it is an option (`-v:/` turns on verbose output and leaves
/// the mount point as the only argument). Refused, by the helper as by the config, with the
/// usage exit code; a host with a space or a `,` likewise.
#[test]
fn issue2_a_source_whose_host_is_an_option_or_not_a_host_is_refused() {
    for (spec, backend, bad) in [
        ("-v:/export", "nfs", "starts with `-`"),
        ("[-v]:/export", "nfs", "starts with `-`"),
        ("-n.efs.example:/", "efs", "starts with `-`"),
        ("//-oremount/share", "cifs", "starts with `-`"),
        ("srv,x=y:/export", "nfs", "','"),
        ("srv\tx:/export", "nfs", "'\\t'"),
    ] {
        let req =
            MountRequest::from_helper_args(spec, Path::new("/m"), &format!("backend={backend}"))
                .unwrap();
        let err = plan(&req).unwrap_err();
        assert!(
            err.to_string().contains(bad) && err.to_string().contains(spec),
            "{spec}: {err}"
        );
        assert_eq!(err.exit_code(), EXIT_USAGE, "{spec}");
    }
    // names, IPv4 and IPv6 (with a zone) still pass
    for spec in [
        "fs-0123abcd.efs.eu-west-1.amazonaws.com:/",
        "10.0.0.5:/export",
        "[fe80::1%eth0]:/export",
        "nfs_01.corp:/x",
    ] {
        let req = MountRequest::from_helper_args(spec, Path::new("/m"), "backend=nfs").unwrap();
        assert!(plan(&req).is_ok(), "{spec}");
    }
}
