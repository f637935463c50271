//! Parsing `/proc/self/mountinfo` (proc(5)): which mount holds a path, what was mounted there,
//! and with which options, so that `doctor` and `mount` judge the real mount rather than
//! what fstab says it should be.

use std::path::{Component, Path, PathBuf};

use crate::config::mount_options::{split_items, MountOptions};

/// Errors reading the mount table.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum MountinfoError {
    /// mount table line {line}: {reason}: `{text}`
    Malformed {
        line: usize,
        reason: &'static str,
        text: String,
    },
}

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id.
    pub id: u32,
    /// The id of the mount it is mounted on (the one it covers, when stacked).
    pub parent: u32,
    /// Path inside the source filesystem that is mounted here (`/` unless a bind of a subtree).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`).
    pub mount_options: String,
    /// Filesystem type (`nfs4`, `cifs`, `ext4`).
    pub fs_type: String,
    /// Mount source (`server:/export`, `//server/share`, `/dev/vda1`).
    pub source: String,
    /// Per-superblock options, where NFS and CIFS report `local_lock=`, `nolock`, `nobrl`.
    pub super_options: String,
}

impl MountEntry {
    /// Mount and superblock options together, for lock-safety checks.
    pub fn all_options(&self) -> MountOptions {
        // The kernel's own option strings can hold values with `=` (cifs `prefixpath=`); those
        // never decide lock safety, so skip what does not parse instead of failing.
        let mut all = MountOptions::default();
        for part in split_items(&self.mount_options)
            .into_iter()
            .chain(split_items(&self.super_options))
        {
            if let Ok(one) = MountOptions::parse(part) {
                all = all.overridden_by(&one);
            }
        }
        all
    }

    /// Whether this is a network filesystem whose locks can reach another host.
    pub fn is_network(&self) -> bool {
        self.fs_type.starts_with("nfs") || self.fs_type == "cifs" || self.fs_type == "smb3"
    }
}

/// Parses the whole table.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountinfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).map_err(|reason| MountinfoError::Malformed {
                line: i + 1,
                reason,
                text: l.to_owned(),
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, &'static str> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ").ok_or("no ` - ` separator")?;
    let left: Vec<&str> = left.split(' ').collect();
    if left.len() < 6 {
        return Err("fewer than six fields before the separator");
    }
    let mut right = right.splitn(3, ' ');
    let fs_type = right.next().ok_or("no filesystem type")?;
    let source = right.next().ok_or("no mount source")?;
    let super_options = right.next().unwrap_or("");
    let id = left[0].parse().map_err(|_| "mount id is not a number")?;
    let parent = left[1].parse().map_err(|_| "parent id is not a number")?;
    Ok(MountEntry {
        id,
        parent,
        root: PathBuf::from(unescape(left[3])),
        mount_point: PathBuf::from(unescape(left[4])),
        mount_options: left[5].to_owned(),
        fs_type: fs_type.to_owned(),
        source: unescape(source),
        super_options: super_options.to_owned(),
    })
}

/// Undoes the kernel's octal escapes (`\040` for space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            // Three octal digits reach 0o777: past a byte, it is no escape the kernel writes.
            match u8::try_from(v) {
                Ok(byte) => out.push(byte),
                Err(_) => out.extend_from_slice(&bytes[i..i + 4]),
            }
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount whose mount point is exactly `dir` (an absolute, symlink-free path) and that a
/// lookup of `dir` reaches: the topmost when several are stacked, and none when a later mount
/// on one of its parents hides it (the directory a lookup reaches is then another one).
pub fn mounted_at<'a>(entries: &'a [MountEntry], dir: &Path) -> Option<&'a MountEntry> {
    containing(entries, dir).filter(|e| e.mount_point == dir)
}

/// The mount that holds `path` (an absolute, symlink-free path): the one a lookup of the
/// path reaches, following the mount tree from the root as the kernel does, so a mount that a
/// later mount on one of its parents hides is passed over. When the table has no root to
/// start from (a chroot can show mounts whose parents it cannot see), the deepest mount point
/// that is a prefix of the path, and the topmost of those.
pub fn containing<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    reached(entries, path).or_else(|| deepest_prefix(entries, path))
}

/// The mount a path lookup reaches: from the root mount, at each prefix of `path` the mount
/// whose parent is the one reached so far, and on that, whatever is stacked on it.
fn reached<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let root = Path::new("/");
    let mut here = entries
        .iter()
        .find(|e| e.mount_point == root && !entries.iter().any(|p| p.id == e.parent))?;
    let mut prefix = PathBuf::new();
    // Each step moves to another entry; more steps than entries means the table has a cycle.
    let mut steps = 0;
    for component in path.components() {
        prefix.push(component);
        while let Some(on) = entries
            .iter()
            .rev()
            .find(|e| e.parent == here.id && e.id != here.id && e.mount_point == prefix)
        {
            steps += 1;
            if steps > entries.len() {
                return None;
            }
            here = on;
        }
    }
    Some(here)
}

fn deepest_prefix<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let depth = |p: &Path| {
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count()
    };
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| path.starts_with(&e.mount_point))
        .max_by_key(|(i, e)| (depth(&e.mount_point), *i))
        .map(|(_, e)| e)
}

/// Whether two mount sources name the same export, ignoring a trailing `/`.
pub fn same_source(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let t = s.trim_end_matches('/');
        if t.is_empty() || t.ends_with(':') {
            format!("{t}/")
        } else {
            t.to_owned()
        }
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines in the kernel's mountinfo format with the super options the kernel reports for such
    // mounts (proc(5), nfs(5), mount.cifs(8)); the build machines have no NFS or CIFS client
    // to capture them from.
    /// An EFS mount as amazon-efs-utils makes it.
    pub(super) const EFS: &str = "433 29 0:52 / /mnt/efs rw,relatime shared:245 - nfs4 fs-0123abcd.efs.eu-west-1.amazonaws.com:/ rw,vers=4.1,rsize=1048576,wsize=1048576,namlen=255,hard,noresvport,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=172.31.5.20,local_lock=none,addr=172.31.9.80";
    /// An NFS mount made with `-o nolock` (NFSv3).
    pub(super) const NFS_NOLOCK: &str = "512 29 0:61 / /mnt/nfs rw,relatime shared:270 - nfs 10.0.0.5:/export rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.5,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.5";
    /// An NFSv4 mount made with `-o local_lock=all`.
    pub(super) const NFS_LOCAL_LOCK: &str = "520 29 0:63 / /mnt/nfs4 rw,relatime shared:280 - nfs4 10.0.0.5:/export rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.9,local_lock=all,addr=10.0.0.5";
    /// An Azure Files SMB mount.
    pub(super) const AZURE_SMB: &str = "601 29 0:70 / /mnt/azure rw,relatime shared:300 - cifs //acct.file.core.windows.net/corda rw,vers=3.1.1,cache=strict,username=acct,uid=0,noforceuid,gid=0,noforcegid,addr=20.60.1.2,file_mode=0777,dir_mode=0777,soft,persistenthandles,nounix,serverino,mapposix,mfsymlinks,nosharesock,rsize=1048576,wsize=1048576,bsize=1048576,echo_interval=60,actimeo=30,closetimeo=1";
    /// A CIFS mount made with `-o nobrl`.
    pub(super) const CIFS_NOBRL: &str = "602 29 0:71 / /mnt/cifs rw,relatime shared:301 - cifs //srv/share rw,vers=3.1.1,cache=strict,username=u,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.7,file_mode=0755,dir_mode=0755,soft,nounix,serverino,mapposix,nobrl,rsize=4194304,wsize=4194304,bsize=1048576,echo_interval=60,actimeo=1,closetimeo=1";

    #[test]
    fn parses_real_lines() {
        let e = parse(EFS).unwrap().remove(0);
        assert_eq!(e.mount_point, Path::new("/mnt/efs"));
        assert_eq!(e.fs_type, "nfs4");
        assert_eq!(e.source, "fs-0123abcd.efs.eu-west-1.amazonaws.com:/");
        assert_eq!(e.all_options().value("local_lock"), Some("none"));
        assert!(e.is_network());
        let smb = parse(AZURE_SMB).unwrap().remove(0);
        assert_eq!(smb.source, "//acct.file.core.windows.net/corda");
        assert!(smb.all_options().contains("mfsymlinks"));
        // an SELinux context with a comma, quoted as the kernel shows it, is one option
        let labelled = EFS.replace(
            "rw,relatime shared",
            r#"rw,context="system_u:object_r:nfs_t:s0:c1,c2",relatime shared"#,
        );
        let o = parse(&labelled).unwrap().remove(0).all_options();
        assert_eq!(
            o.value("context"),
            Some(r#""system_u:object_r:nfs_t:s0:c1,c2""#)
        );
        assert!(o.contains("relatime") && !o.keys().any(|k| k.starts_with("c2")));
    }

    #[test]
    fn lock_hazards_in_captured_lines() {
        use crate::config::mount_options::lock_hazard;
        let check = |line: &str| {
            let e = parse(line).unwrap().remove(0);
            lock_hazard(&e.fs_type, &e.all_options()).map(|h| h.option)
        };
        assert_eq!(check(EFS), None);
        assert_eq!(check(AZURE_SMB), None);
        assert_eq!(check(NFS_NOLOCK).as_deref(), Some("nolock"));
        assert_eq!(check(NFS_LOCAL_LOCK).as_deref(), Some("local_lock=all"));
        assert_eq!(check(CIFS_NOBRL).as_deref(), Some("nobrl"));
    }

    #[test]
    fn unescapes_octal_and_finds_the_containing_mount() {
        let table = "1 0 8:1 / / rw - ext4 /dev/vda1 rw\n\
                     2 1 0:30 / /var/lib/my\\040share rw - tmpfs tmpfs rw\n\
                     3 1 0:31 / /var/lib rw - xfs /dev/vdb rw\n\
                     4 3 0:30 / /var/lib/my\\040share rw - tmpfs tmpfs rw,size=1024k\n";
        let t = parse(table).unwrap();
        let share = containing(&t, Path::new("/var/lib/my share/x")).unwrap();
        assert_eq!(
            share.super_options, "rw,size=1024k",
            "the mount stacked last wins"
        );
        assert_eq!(
            containing(&t, Path::new("/var/lib/other")).unwrap().fs_type,
            "xfs"
        );
        assert_eq!(
            containing(&t, Path::new("/var/libx")).unwrap().fs_type,
            "ext4"
        );
        assert!(mounted_at(&t, Path::new("/var/lib/my share")).is_some());
        assert!(mounted_at(&t, Path::new("/var")).is_none());
    }

    #[test]
    fn a_mount_hidden_by_a_later_mount_on_its_parent_is_passed_over() {
        // The share was mounted on /mnt/share, then a tmpfs on /mnt hid it: a path under
        // /mnt/share is on the tmpfs now, whatever the deeper entry says.
        let table = "20 1 8:1 / / rw - ext4 /dev/vda1 rw\n\
                     30 20 0:50 / /mnt/share rw - nfs4 srv:/export rw,local_lock=none\n\
                     31 20 0:51 / /mnt rw - tmpfs tmpfs rw\n";
        let t = parse(table).unwrap();
        let e = containing(&t, Path::new("/mnt/share/locks")).unwrap();
        assert_eq!(e.fs_type, "tmpfs", "{e:?}");
        // a cycle in a malformed table ends the walk; the prefix rule answers
        let cyclic = "1 9 8:1 / / rw - ext4 /dev/vda1 rw\n\
                      5 6 0:50 / /a rw - tmpfs t rw\n\
                      6 5 0:51 / /a rw - tmpfs t rw\n";
        assert!(containing(&parse(cyclic).unwrap(), Path::new("/a/b")).is_some());
    }

    #[test]
    fn the_mount_a_lookup_reaches_is_found_in_the_live_table() {
        if !crate::sys::is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs this as root");
            eprintln!("skipped: the_mount_a_lookup_reaches_is_found_in_the_live_table: not root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let outer = tmp.path().canonicalize().unwrap().join("mnt");
        let share = outer.join("share");
        std::fs::create_dir_all(&share).unwrap();
        let mount = |dir: &Path, size: &str| {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", size, "tmpfs"])
                .arg(dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount tmpfs on {dir:?}");
        };
        let umount = |dir: &Path| {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status();
        };
        mount(&share, "size=1m");
        mount(&outer, "size=2m");
        std::fs::create_dir_all(&share).unwrap();
        let text = std::fs::read_to_string(crate::sys::MOUNTINFO_PATH).unwrap();
        let found = containing(&parse(&text).unwrap(), &share).cloned();
        umount(&outer);
        umount(&share);
        let found = found.unwrap();
        assert_eq!(found.mount_point, outer, "{found:?}");
        assert!(found.super_options.contains("size=2048k"), "{found:?}");
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = parse("1 0 8:1 / / rw - ext4 /dev/vda1 rw\ngarbage\n").unwrap_err();
        assert!(err.to_string().starts_with("mount table line 2"), "{err}");
    }

    #[test]
    fn sources_compare_modulo_trailing_slash() {
        assert!(same_source("h:/", "h:/"));
        assert!(same_source("h:/export/", "h:/export"));
        assert!(same_source("//s/share/", "//s/share"));
        assert!(!same_source("h:/a", "h:/b"));
    }
}
