//! `artemis-sync doctor`: one check per line (config, mount, locks, link, writable, free space),
//! each ok, warn, fail or skip, with the fix named. It judges the live mount table, not the
//! config's intentions, so it catches a share mounted by hand with `nolock` as surely as one
//! that is not mounted at all.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::config::{Backend, Capture, Config, ConfigError};
use crate::link::{inspect, LinkState};
use crate::shared::lock_safety::{self, LockVerdict};
use crate::shared::mount::same_file;
use crate::shared::mountinfo::{self, MountEntry};
use crate::sys::Sys;

/// Below this much free space on the share, `doctor` warns (a few Artemis journal files).
pub const FREE_WARN_BYTES: u64 = 1 << 30;
/// Below this much free space, `doctor` fails: Artemis cannot create its next journal file.
pub const FREE_FAIL_BYTES: u64 = 100 << 20;
/// The size of the file `doctor` writes to prove the share is writable.
pub const WRITE_PROBE_BYTES: usize = 4096;
/// The device the FUSE capture mounts through.
pub const FUSE_DEVICE: &str = "/dev/fuse";

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but should be looked at.
    Warn,
    /// Broken: the agent would refuse to run, or the journal is at risk.
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name: `config`, `mount`, `locks`, `link`, `writable`, `free_space`.
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// All checks, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// False when any check failed.
    pub ok: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Self {
        let ok = checks.iter().all(|c| c.status != Status::Fail);
        Report { ok, checks }
    }

    /// One line per check, and an indented `fix:` line under each that is not ok.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let _ = writeln!(s, "{:<5} {:<11} {}", c.status.label(), c.name, c.detail);
            if let Some(fix) = &c.fix {
                let _ = writeln!(s, "{:<17} fix: {fix}", "");
            }
        }
        s
    }
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix,
    }
}

/// Runs every check for the config loaded (or not) from `path`.
pub fn run(loaded: Result<&Config, &ConfigError>, path: &Path, sys: &dyn Sys) -> Report {
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            return Report::new(vec![check(
                "config",
                Status::Fail,
                e.to_string(),
                Some(format!("edit {}", path.display())),
            )]);
        }
    };
    let mut checks = vec![check(
        "config",
        Status::Ok,
        format!("{} is valid", path.display()),
        None,
    )];
    // replicated mode mounts no share and locks nothing on one: its journal is data_dir
    let mut mounted = true;
    if config.replication.is_none() {
        let (mount, holder) = mount_check_of(config, sys);
        mounted = mount.status != Status::Fail;
        checks.push(mount);
        checks.push(match holder {
            // the agent judges `[lock] dir`'s mount (which need not be the share's): so does this
            Some(share) => {
                let table = sys.mountinfo().ok().and_then(|t| mountinfo::parse(&t).ok());
                let lock_dir = table
                    .as_deref()
                    .and_then(|t| lock_safety::lock_dir_mount(t, &config.lock.dir));
                locks_check(config, lock_dir.unwrap_or(&share))
            }
            None => check("locks", Status::Skip, "the share is not mounted", None),
        });
    }
    checks.push(link_check(config));
    if let Some(r) = config
        .replication
        .as_ref()
        .filter(|r| r.capture == Capture::Fuse)
    {
        checks.push(fuse_check(Path::new(FUSE_DEVICE), &r.mount_point));
    }
    let dir = match &config.replication {
        Some(r) => &r.data_dir,
        None => &config.storage.mount_point,
    };
    if mounted {
        let fix = if config.replication.is_some() {
            "create data_dir, owned by the node's user, on a local disk that is mounted read-write"
        } else {
            "check that the share is exported read-write and that root may write to it (NFS root squash, SMB file_mode)"
        };
        checks.push(writable_check(dir, fix));
        checks.push(free_check(dir));
    } else {
        for name in ["writable", "free_space"] {
            checks.push(check(name, Status::Skip, "the share is not mounted", None));
        }
    }
    Report::new(checks)
}

/// `capture = "fuse"`: the FUSE device opens for reading and writing (the agent mounts with
/// it), and `mount_point` is not a dead mount left by a killed agent.
fn fuse_check(device: &Path, mount_point: &Path) -> Check {
    if let Err(e) = OpenOptions::new().read(true).write(true).open(device) {
        return check(
            "fuse",
            Status::Fail,
            format!("cannot open {}: {e}", device.display()),
            Some(
                "load the module (`modprobe fuse`, and list `fuse` in /etc/modules-load.d/), \
                 and run the agent as root"
                    .into(),
            ),
        );
    }
    match fs::metadata(mount_point) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => check(
            "fuse",
            Status::Warn,
            format!(
                "{} is a dead FUSE mount (its agent was killed)",
                mount_point.display()
            ),
            Some(format!(
                "the agent detaches it when it starts; by hand: umount -l {}",
                mount_point.display()
            )),
        ),
        _ => check(
            "fuse",
            Status::Ok,
            format!("{} opens; the agent can serve the mount", device.display()),
            None,
        ),
    }
}

/// The `mount` check against the live mount table, and the mount that holds the share.
fn mount_check_of(config: &Config, sys: &dyn Sys) -> (Check, Option<MountEntry>) {
    let s = &config.storage;
    let table = sys
        .mountinfo()
        .map_err(|e| e.to_string())
        .and_then(|t| mountinfo::parse(&t).map_err(|e| e.to_string()));
    match (&table, &s.mount_point.canonicalize()) {
        (Err(e), _) => (
            check(
                "mount",
                Status::Fail,
                format!("cannot read the mount table: {e}"),
                None,
            ),
            None,
        ),
        (_, Err(e)) => (
            check(
                "mount",
                Status::Fail,
                format!("mount point {}: {e}", s.mount_point.display()),
                Some(format!(
                    "create it (`mkdir -p {}`) and mount the share (`artemis-sync mount`)",
                    s.mount_point.display()
                )),
            ),
            None,
        ),
        (Ok(table), Ok(dir)) => mount_check(config, table, dir),
    }
}

/// Whether `${BASE_DIR}/artemis` links to the mount point (replicated mode: to what the hot
/// agent links it to, [`Config::link_target`]).
fn link_check(config: &Config) -> Check {
    let link = config.artemis_link();
    let share = &config.link_target();
    match inspect(&link, share) {
        Ok(LinkState::Correct) => check("link", Status::Ok, format!("{} -> {}", link.display(), share.display()), None),
        // the replicated agent makes the link when its VM turns hot: a cold VM may have none
        Ok(LinkState::Missing) if config.replication.is_some() => check("link", Status::Warn,
            format!("{} does not exist: the agent links it to {} when this VM turns hot", link.display(), share.display()),
            Some("nothing on a cold VM; on the hot VM, see the agent's log (`journalctl -u artemis-sync`)".into())),
        Ok(LinkState::Missing) => check("link", Status::Fail, format!("{} does not exist", link.display()), Some("run `artemis-sync link`".into())),
        Ok(LinkState::Elsewhere(t)) => check("link", Status::Fail, format!("{} points to {}, not the link target {}", link.display(), t.display(), share.display()), Some(relink_fix(&link, &t))),
        Ok(LinkState::Directory(n)) => check("link", Status::Fail, format!("{} is a real directory with {n} entries", link.display()),
            Some("run `artemis-sync link --migrate` (copies into the share, verifies, keeps the old directory aside)".into())),
        Ok(LinkState::Other) => check("link", Status::Fail, format!("{} is neither a link nor a directory", link.display()), Some("move it away, then run `artemis-sync link`".into())),
        Err(e) => check("link", Status::Fail, e.to_string(), None),
    }
}

/// The fix for a link that points elsewhere. `link --force` only relinks: where the old
/// target holds files (it may be the journal, left where the node ran until now), it says so
/// and how to bring them along instead of leaving the node an empty journal.
fn relink_fix(link: &Path, target: &Path) -> String {
    let resolved = link
        .parent()
        .map_or(target.to_owned(), |dir| dir.join(target));
    match fs::read_dir(&resolved).map(Iterator::count) {
        Ok(n) if n > 0 => format!(
            "`artemis-sync link --force` only relinks: it moves none of the {n} entries of {t}. \
             If they are the journal, with the node stopped replace the link by them \
             (`rm {l} && mv {t} {l}`) and run `artemis-sync link --migrate`; \
             otherwise run `artemis-sync link --force`",
            t = resolved.display(),
            l = link.display()
        ),
        _ => "run `artemis-sync link --force`".into(),
    }
}

/// Whether the configured share is what is mounted at the mount point; returns the mount
/// that holds the mount point for the lock check.
fn mount_check(config: &Config, table: &[MountEntry], dir: &Path) -> (Check, Option<MountEntry>) {
    let s = &config.storage;
    let fix_mount = Some(format!("run `artemis-sync mount`, or add the line from `artemis-sync fstab` to /etc/fstab and `mount {}`", s.mount_point.display()));
    let holder = mountinfo::containing(table, dir).cloned();
    if s.backend() == Backend::Premounted {
        let on = holder.as_ref().map_or("?".into(), |e| {
            format!(
                "{} on {} ({})",
                e.source,
                e.mount_point.display(),
                e.fs_type
            )
        });
        return (
            check(
                "mount",
                Status::Ok,
                format!("premounted {} is a directory in {on}", dir.display()),
                None,
            ),
            holder,
        );
    }
    let Some(here) = mountinfo::mounted_at(table, dir) else {
        return (
            check(
                "mount",
                Status::Fail,
                format!("nothing is mounted on {}", dir.display()),
                fix_mount,
            ),
            None,
        );
    };
    let same = if s.backend() == Backend::Bind {
        same_file(Path::new(&s.source), dir)
    } else {
        mountinfo::same_source(&here.source, &s.source)
    };
    if same {
        (
            check(
                "mount",
                Status::Ok,
                format!("{} on {} ({})", s.source, dir.display(), here.fs_type),
                None,
            ),
            Some(here.clone()),
        )
    } else {
        (
            check(
                "mount",
                Status::Fail,
                format!(
                    "{} is mounted from {} ({}), not from {}",
                    dir.display(),
                    here.source,
                    here.fs_type,
                    s.source
                ),
                Some(format!(
                    "umount {} and run `artemis-sync mount`",
                    dir.display()
                )),
            ),
            None,
        )
    }
}

/// The `locks` check: whether locks on the filesystem of `entry` reach the other VM
/// ([`lock_safety::judge`], the judgement the agent acts on).
fn locks_check(config: &Config, entry: &MountEntry) -> Check {
    match lock_safety::judge(entry, config.lock.allow_local_locks) {
        LockVerdict::Safe { detail } => check("locks", Status::Ok, detail, None),
        LockVerdict::Doubtful { detail, fix } => check("locks", Status::Warn, detail, Some(fix)),
        LockVerdict::Unsafe { detail, fix } => check("locks", Status::Fail, detail, Some(fix)),
    }
}

fn writable_check(dir: &Path, fix: &str) -> Check {
    let probe = dir.join(format!(".artemis-sync-doctor.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        f.write_all(&[0u8; WRITE_PROBE_BYTES])?;
        f.sync_all()?;
        drop(f);
        fs::remove_file(&probe)
    })();
    match result {
        Ok(()) => check(
            "writable",
            Status::Ok,
            format!(
                "wrote and fsynced {WRITE_PROBE_BYTES} bytes in {}",
                dir.display()
            ),
            None,
        ),
        Err(e) => {
            let _ = fs::remove_file(&probe);
            check(
                "writable",
                Status::Fail,
                format!("cannot write in {}: {e}", dir.display()),
                Some(fix.into()),
            )
        }
    }
}

fn free_check(dir: &Path) -> Check {
    match crate::sys::free_bytes(dir) {
        Err(e) => check(
            "free_space",
            Status::Fail,
            format!("cannot read free space of {}: {e}", dir.display()),
            None,
        ),
        Ok(free) => {
            let mib = free >> 20;
            if free < FREE_FAIL_BYTES {
                check(
                    "free_space",
                    Status::Fail,
                    format!("{mib} MiB free on {}", dir.display()),
                    Some(format!(
                        "free space or grow the share: Artemis needs at least {} MiB",
                        FREE_FAIL_BYTES >> 20
                    )),
                )
            } else if free < FREE_WARN_BYTES {
                check(
                    "free_space",
                    Status::Warn,
                    format!("{mib} MiB free on {}", dir.display()),
                    Some(format!(
                        "grow the share above {} MiB",
                        FREE_WARN_BYTES >> 20
                    )),
                )
            } else {
                check(
                    "free_space",
                    Status::Ok,
                    format!("{mib} MiB free on {}", dir.display()),
                    None,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::CommandOutcome;
    use std::ffi::OsString;
    use std::time::Duration;

    struct Table(String);
    impl Sys for Table {
        fn run_mount(&self, _: &[OsString]) -> std::io::Result<CommandOutcome> {
            unreachable!("doctor never mounts")
        }
        fn probe(&self, _: &str, _: u16, _: Duration) -> std::io::Result<()> {
            unreachable!("doctor never probes")
        }
        fn mountinfo(&self) -> std::io::Result<String> {
            Ok(self.0.clone())
        }
        fn sleep(&self, _: Duration) {}
        fn mount_program(&self) -> OsString {
            "mount".into()
        }
    }

    fn efs_config(share: &Path, base: &Path) -> Config {
        Config::from_toml(Path::new("agent.toml"), &format!(
            "[node]\nbase_dir = {base:?}\n[storage]\nbackend = \"efs\"\nsource = \"fs-1.efs.eu-west-1.amazonaws.com:/\"\nmount_point = {share:?}\n"
        )).unwrap()
    }

    fn statuses(r: &Report) -> Vec<(&'static str, Status)> {
        r.checks.iter().map(|c| (c.name, c.status)).collect()
    }

    /// The mount table as the kernel would show an NFS share with `opts` on `dir`.
    fn nfs_table(dir: &Path, fs_type: &str, source: &str, opts: &str) -> String {
        format!("1 0 8:1 / / rw - ext4 /dev/vda1 rw\n2 1 0:50 / {} rw,relatime - {fs_type} {source} {opts}\n", dir.display())
    }

    #[test]
    fn healthy_nfs_share_is_all_ok() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let base = tmp.path().join("corda");
        fs::create_dir_all(&share).unwrap();
        fs::create_dir_all(&base).unwrap();
        std::os::unix::fs::symlink(&share, base.join("artemis")).unwrap();
        let config = efs_config(&share, &base);
        let sys = Table(nfs_table(
            &share.canonicalize().unwrap(),
            "nfs4",
            "fs-1.efs.eu-west-1.amazonaws.com:/",
            "rw,vers=4.1,hard,local_lock=none",
        ));
        let r = run(Ok(&config), Path::new("agent.toml"), &sys);
        assert!(r.ok, "{}", r.to_text());
        assert!(
            r.checks.iter().all(|c| c.status == Status::Ok),
            "{}",
            r.to_text()
        );
    }

    #[test]
    fn lock_breaking_options_fail_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().canonicalize().unwrap().join("share");
        fs::create_dir(&share).unwrap();
        let config = efs_config(&share, tmp.path());
        for (fs_type, opts, bad) in [
            ("nfs4", "rw,vers=4.1,hard,nolock,local_lock=none", "nolock"),
            ("nfs4", "rw,vers=4.1,hard,local_lock=all", "local_lock=all"),
            ("nfs", "rw,vers=3,local_lock=flock", "local_lock=flock"),
        ] {
            let sys = Table(nfs_table(
                &share,
                fs_type,
                "fs-1.efs.eu-west-1.amazonaws.com:/",
                opts,
            ));
            let r = run(Ok(&config), Path::new("agent.toml"), &sys);
            let locks = r.checks.iter().find(|c| c.name == "locks").unwrap();
            assert_eq!(locks.status, Status::Fail, "{opts}");
            assert!(locks.detail.contains(bad), "{}", locks.detail);
            assert!(
                locks.fix.as_deref().unwrap().contains("remount"),
                "{:?}",
                locks.fix
            );
            assert!(!r.ok);
        }
        let smb = Config::from_toml(Path::new("agent.toml"), &format!(
            "[node]\nbase_dir = {:?}\n[storage]\nbackend = \"cifs\"\nsource = \"//srv/share\"\nmount_point = {share:?}\n", tmp.path()
        )).unwrap();
        let sys = Table(nfs_table(
            &share,
            "cifs",
            "//srv/share",
            "rw,vers=3.1.1,nobrl,serverino",
        ));
        let r = run(Ok(&smb), Path::new("agent.toml"), &sys);
        let locks = r.checks.iter().find(|c| c.name == "locks").unwrap();
        assert_eq!(locks.status, Status::Fail);
        assert!(locks.detail.contains("nobrl") && locks.fix.as_deref().unwrap().contains("nobrl"));
    }

    #[test]
    fn unmounted_or_wrong_source_fails_and_skips_what_depends_on_it() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().canonicalize().unwrap().join("share");
        fs::create_dir(&share).unwrap();
        let config = efs_config(&share, tmp.path());
        let r = run(
            Ok(&config),
            Path::new("agent.toml"),
            &Table("1 0 8:1 / / rw - ext4 /dev/vda1 rw\n".into()),
        );
        assert_eq!(
            statuses(&r)[1..],
            [
                ("mount", Status::Fail),
                ("locks", Status::Skip),
                ("link", Status::Fail),
                ("writable", Status::Skip),
                ("free_space", Status::Skip)
            ]
        );
        let r = run(
            Ok(&config),
            Path::new("agent.toml"),
            &Table(nfs_table(&share, "nfs4", "other:/", "rw,local_lock=none")),
        );
        assert!(
            r.checks[1].detail.contains("mounted from other:/"),
            "{}",
            r.to_text()
        );
        let text = r.to_text();
        assert!(
            text.contains("FAIL  mount") && text.contains("fix: umount"),
            "{text}"
        );
    }

    /// A share hidden by a later mount on its mount point's parent: doctor said `ok mount`
    /// from the hidden entry, while the journal's path led to the mount on top.
    #[test]
    fn issue2_a_share_hidden_by_a_mount_on_its_parent_fails_the_mount_check() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let share = root.join("share");
        fs::create_dir(&share).unwrap();
        let config = efs_config(&share, &root);
        let table = format!(
            "{}3 1 0:51 / {} rw - tmpfs tmpfs rw\n",
            nfs_table(
                &share,
                "nfs4",
                "fs-1.efs.eu-west-1.amazonaws.com:/",
                "rw,vers=4.1,hard,local_lock=none"
            ),
            root.display()
        );
        let r = run(Ok(&config), Path::new("agent.toml"), &Table(table));
        let mount = r.checks.iter().find(|c| c.name == "mount").unwrap();
        assert_eq!(mount.status, Status::Fail, "{}", r.to_text());
        assert!(
            mount.detail.contains("nothing is mounted"),
            "{}",
            r.to_text()
        );
    }

    #[test]
    fn local_filesystem_needs_allow_local_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let share = base.join("share");
        fs::create_dir(&share).unwrap();
        let text = format!("[node]\nbase_dir = {base:?}\n[storage]\nbackend = \"premounted\"\nmount_point = {share:?}\n");
        let sys = Table("1 0 8:1 / / rw - ext4 /dev/vda1 rw\n".into());
        let r = run(
            Ok(&Config::from_toml(Path::new("a"), &text).unwrap()),
            Path::new("a"),
            &sys,
        );
        let locks = &r.checks[2];
        assert_eq!((locks.name, locks.status), ("locks", Status::Fail));
        assert!(locks.fix.as_deref().unwrap().contains("allow_local_locks"));
        let allowed = format!("{text}[lock]\nallow_local_locks = true\n");
        let r = run(
            Ok(&Config::from_toml(Path::new("a"), &allowed).unwrap()),
            Path::new("a"),
            &sys,
        );
        assert_eq!(r.checks[2].status, Status::Ok);
    }

    #[test]
    fn issue12_fuse_check_names_a_missing_device_and_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let c = fuse_check(&dir.path().join("no-fuse"), dir.path());
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("modprobe fuse"));
        let c = fuse_check(Path::new("/dev/null"), dir.path());
        assert_eq!(c.status, Status::Ok, "{}", c.detail);
    }

    #[test]
    fn invalid_config_is_one_failing_line() {
        let err = Config::from_toml(Path::new("/etc/x.toml"), "[node]\n").unwrap_err();
        let r = run(Err(&err), Path::new("/etc/x.toml"), &Table(String::new()));
        assert!(!r.ok);
        assert_eq!(r.checks.len(), 1);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][0]["status"], "fail");
        assert!(json["checks"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("/etc/x.toml"));
    }

    /// The report's link check has `status` and a detail holding `says`.
    #[track_caller]
    fn assert_link(r: &Report, status: Status, says: &str) {
        let link = r.checks.iter().find(|c| c.name == "link").unwrap();
        assert_eq!(link.status, status, "{}", r.to_text());
        assert!(link.detail.contains(says), "{}", r.to_text());
    }

    /// Replicated mode mounts no share: a hot VM set up as the agent sets it up (watch capture,
    /// `${BASE_DIR}/artemis` a link to `data_dir`) was judged against `[storage] mount_point`,
    /// a share it does not have: `FAIL link ... points to <data_dir>, not the share` with the
    /// fix `artemis-sync link --force`, which would have pointed the link at that empty
    /// directory; and the unused share directory's local filesystem failed the locks check.
    #[test]
    fn replicated_mode_judges_its_own_link_and_data_dir_not_a_share() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let (data, base) = (root.join("data"), root.join("corda"));
        for d in [&data, &base] {
            fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(&data, base.join("artemis")).unwrap();
        let config = Config::from_toml(Path::new("agent.toml"), &format!(
            "[node]\nbase_dir = {base:?}\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
             data_dir = {data:?}\nlisten = \"127.0.0.1:7410\"\npeer = \"127.0.0.1:7411\"\n\
             insecure_loopback = true\ncapture = \"watch\"\nstate_file = {:?}\n",
            root.join("state.json")
        )).unwrap();
        let sys = Table("1 0 8:1 / / rw - ext4 /dev/vda1 rw\n".into());
        let r = run(Ok(&config), Path::new("agent.toml"), &sys);
        assert!(r.ok, "{}", r.to_text());
        let link = r.checks.iter().find(|c| c.name == "link").unwrap();
        assert_eq!(link.status, Status::Ok, "{}", r.to_text());
        for name in ["writable", "free_space"] {
            let c = r.checks.iter().find(|c| c.name == name).unwrap();
            assert!(
                c.detail.contains(&*data.to_string_lossy()),
                "{}",
                r.to_text()
            );
        }
        // a link elsewhere names the fix that links to data_dir
        fs::remove_file(base.join("artemis")).unwrap();
        std::os::unix::fs::symlink(&root, base.join("artemis")).unwrap();
        let r = run(Ok(&config), Path::new("agent.toml"), &sys);
        assert_link(&r, Status::Fail, "not the link target");
        // issue 7: where the old target holds files (it may be the journal), the fix says that
        // `--force` moves none of them and how to bring them along; it offered `--force` alone,
        // which left the node an empty journal
        let fix = |r: &Report| {
            let c = r.checks.iter().find(|c| c.name == "link").unwrap();
            c.fix.clone().unwrap_or_default()
        };
        let said = fix(&r);
        assert!(
            said.contains("moves none of the") && said.contains("link --migrate"),
            "{said}"
        );
        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        fs::remove_file(base.join("artemis")).unwrap();
        std::os::unix::fs::symlink(&empty, base.join("artemis")).unwrap();
        let r = run(Ok(&config), Path::new("agent.toml"), &sys);
        assert_eq!(fix(&r), "run `artemis-sync link --force`");
        // and that fix links to data_dir, after which doctor is content
        let fix = crate::link::LinkOptions {
            migrate: false,
            force: true,
        };
        crate::cli::commands::link(&config, fix).unwrap();
        assert_eq!(fs::read_link(base.join("artemis")).unwrap(), data);
        assert!(run(Ok(&config), Path::new("agent.toml"), &sys).ok);
        // a cold VM has no link until it turns hot: a warning, not a failure
        fs::remove_file(base.join("artemis")).unwrap();
        let r = run(Ok(&config), Path::new("agent.toml"), &sys);
        assert_link(&r, Status::Warn, "when this VM turns hot");
        assert!(r.ok, "{}", r.to_text());
    }

    /// `[lock] dir` apart from the share (on a local filesystem): the agent refuses it, and
    /// doctor, which judged the share's mount, said `ok locks`.
    #[test]
    fn issue3_doctor_judges_the_lock_dir_s_mount_as_the_agent_does() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let share = root.join("share");
        let base = root.join("corda");
        let locks = root.join("locks");
        for d in [&share, &base, &locks] {
            fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(&share, base.join("artemis")).unwrap();
        let config = Config::from_toml(Path::new("agent.toml"), &format!(
            "[node]\nbase_dir = {base:?}\n[storage]\nbackend = \"efs\"\nsource = \"fs-1.efs.eu-west-1.amazonaws.com:/\"\nmount_point = {share:?}\n[lock]\ndir = {locks:?}\n"
        )).unwrap();
        let table = nfs_table(
            &share,
            "nfs4",
            "fs-1.efs.eu-west-1.amazonaws.com:/",
            "rw,vers=4.1,hard,local_lock=none",
        );
        // what the agent's check_lock_dir decides, on the same table
        let parsed = mountinfo::parse(&table).unwrap();
        let agent = lock_safety::judge(mountinfo::containing(&parsed, &locks).unwrap(), false);
        assert!(matches!(agent, LockVerdict::Unsafe { .. }), "{agent:?}");
        let r = run(Ok(&config), Path::new("agent.toml"), &Table(table));
        let c = r.checks.iter().find(|c| c.name == "locks").unwrap();
        assert_eq!(
            c.status,
            Status::Fail,
            "the agent refuses lock dir {locks:?} (local ext4) but doctor says: {}",
            r.to_text()
        );
    }
}
