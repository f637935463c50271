//! Real mounts (bind, tmpfs): only as root. Every mount is undone by a [`MountGuard`], also
//! when an assertion fails.

use std::ffi::OsStr;
use std::fs;

use crate::util::*;

fn bind_config(base: &std::path::Path, src: &std::path::Path, mnt: &std::path::Path) -> String {
    format!(
        "[node]\nbase_dir = {}\n\n[storage]\nbackend = \"bind\"\nsource = {}\nmount_point = {}\n\n\
         [lock]\nallow_local_locks = true\n",
        toml_path(base),
        toml_path(src),
        toml_path(mnt)
    )
}

#[test]
fn issue2_bind_mount_through_the_helper_then_link_and_doctor() {
    if !require_root(
        "issue2_bind_mount_through_the_helper_then_link_and_doctor",
        "bind mounts need root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let other = fx.mkdir("other-src");
    let mnt = fx.mkdir("mnt");
    let base = fx.mkdir("corda");
    fx.write("src/journal/activemq-data-1.amq", vec![0x5au8; 64 * 1024]);
    fx.write("src/server.lock", b"");
    fx.write(
        "other-src/journal/activemq-data-1.amq",
        b"someone else's journal",
    );
    let before = snapshot(&src);
    let other_before = snapshot(&other);
    let _guard = MountGuard::new(&mnt);
    let (s, m) = (src.to_str().unwrap(), mnt.to_str().unwrap());

    // the helper, with the real mount program
    run(helper_cmd().args([
        s,
        m,
        "-o",
        "backend=bind,_netdev,nofail,x-systemd.mount-timeout=180",
    ]))
    .code(0);
    assert_eq!(mounts_at(&mnt).len(), 1, "{:?}", mounts_at(&mnt));
    assert_eq!(
        snapshot(&mnt),
        before,
        "the mount point does not show the source"
    );
    // again: already mounted, nothing stacked
    run(helper_cmd().args([s, m, "-v", "-o", "backend=bind"]))
        .code(0)
        .stdout_has(&["already mounted"]);
    assert_eq!(mounts_at(&mnt).len(), 1, "{:?}", mounts_at(&mnt));

    // the command line on the same mount
    let config = fx.write("agent.toml", bind_config(&base, &src, &mnt));
    artemis_sync(&config, ["mount"]).code(0).stdout_has(&[
        &format!("{s} is already mounted on {m}"),
        "ok    mount",
        "ok    locks",
    ]);
    assert_eq!(mounts_at(&mnt).len(), 1);
    let link = base.join("artemis");
    artemis_sync(&config, ["link"])
        .code(0)
        .stdout_has(&["linked"]);
    assert_eq!(fs::read_link(&link).unwrap(), mnt);
    assert_eq!(
        snapshot(&link),
        before,
        "the link does not lead to the source"
    );
    let doctor = artemis_sync(&config, ["doctor", "--json"]);
    doctor.code(0);
    let report: serde_json::Value =
        serde_json::from_str(&doctor.stdout).expect("doctor --json is JSON");
    assert_eq!(report["ok"], true, "{doctor}");
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["config", "mount", "locks", "link", "writable", "free_space"]
    );
    for check in checks {
        assert_eq!(check["status"], "ok", "{check}");
    }
    artemis_sync(&config, ["link"])
        .code(0)
        .stdout_has(&["nothing to do"]);
    assert_eq!(snapshot(&src), before, "doctor or link changed the share");

    // a write through the link lands in the source
    fs::write(link.join("journal/activemq-data-2.amq"), b"new").unwrap();
    assert_eq!(
        fs::read(src.join("journal/activemq-data-2.amq")).unwrap(),
        b"new"
    );

    // another source on the same mount point is refused, naming what is there
    let out = run(helper_cmd().args([other.to_str().unwrap(), m, "-o", "backend=bind"]));
    // the current source is named by the directory bound there (its path inside its filesystem)
    let bound = format!("{}/src)", fx.root.file_name().unwrap().to_str().unwrap());
    out.code(32).stderr_has(&[
        m,
        "already mounted from",
        &bound,
        other.to_str().unwrap(),
        "unmount it first",
    ]);
    assert_eq!(mounts_at(&mnt).len(), 1);
    assert_eq!(
        fs::read(mnt.join("journal/activemq-data-2.amq")).unwrap(),
        b"new"
    );
    assert_eq!(snapshot(&other), other_before);
}

#[test]
fn artemis_sync_mount_creates_the_mount_point_and_bind_mounts() {
    if !require_root(
        "artemis_sync_mount_creates_the_mount_point_and_bind_mounts",
        "bind mounts need root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let base = fx.mkdir("corda");
    fx.write("src/journal/activemq-data-1.amq", b"journal");
    let before = snapshot(&src);
    let mnt = fx.path("var/lib/artemis-sync/share");
    let _guard = MountGuard::new(&mnt);
    let config = fx.write("agent.toml", bind_config(&base, &src, &mnt));
    artemis_sync(&config, ["mount"]).code(0).stdout_has(&[
        &format!("mounted {} on {} (attempt 1)", src.display(), mnt.display()),
        "ok    writable",
    ]);
    assert_eq!(mounts_at(&mnt).len(), 1);
    assert_eq!(snapshot(&mnt), before);
    artemis_sync(&config, ["mount"])
        .code(0)
        .stdout_has(&["already mounted"]);
    assert_eq!(mounts_at(&mnt).len(), 1);
    // doctor without the link: exit 4, the link check names the fix
    let doctor = artemis_sync(&config, ["doctor"]);
    doctor
        .code(4)
        .stdout_has(&["FAIL  link", "fix: run `artemis-sync link`"]);
}

#[test]
fn issue2_migration_onto_a_full_share_is_refused_and_changes_nothing() {
    if !require_root(
        "issue2_migration_onto_a_full_share_is_refused_and_changes_nothing",
        "tmpfs mounts need root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let base = fx.mkdir("corda");
    let share = fx.mkdir("share");
    for i in 1..=4 {
        let data: Vec<u8> = (0..1u32 << 20).map(|b| (b ^ i).to_le_bytes()[0]).collect();
        fx.write(
            &format!("corda/artemis/journal/activemq-data-{i}.amq"),
            data,
        );
    }
    let source = base.join("artemis");
    let before = snapshot(&source);
    let _guard = MountGuard::new(&share);
    system(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("-o"),
            OsStr::new("size=1m"),
            OsStr::new("tmpfs"),
            share.as_os_str(),
        ],
    );
    assert_eq!(mounts_at(&share).len(), 1);
    let config = fx.write("agent.toml", premounted_config(&base, &share));
    artemis_sync(&config, ["link", "--migrate"])
        .code(5)
        .stderr_has(&[
            "not enough space",
            &share.display().to_string(),
            "needs 4194304 bytes",
            "nothing was changed",
        ]);
    assert!(source.is_dir() && !source.is_symlink());
    assert_eq!(snapshot(&source), before, "the source changed");
    assert!(
        names(&share).is_empty(),
        "written to the share: {:?}",
        names(&share)
    );
    assert_eq!(
        names(&base),
        ["artemis"],
        "an aside directory or temporary was left"
    );
}

/// The per-mount options (`rw`/`ro`...) of the one mount on `dir`.
fn mount_flags(dir: &std::path::Path) -> String {
    let mounts = mounts_at(dir);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    mounts[0].split(' ').nth(5).unwrap().to_owned()
}

/// `mount -o remount,ro` of an fstab entry of type artemis-sync reaches the helper as
/// `-o ro,remount,backend=...` (what util-linux's mount passes on). It changes the share
/// mounted there, stacking nothing; it once reported success and changed nothing. A remount
/// where nothing is mounted is refused, mounting nothing.
#[test]
fn helper_remount_changes_the_mounted_share_and_stacks_nothing() {
    if !require_root(
        "helper_remount_changes_the_mounted_share_and_stacks_nothing",
        "bind mounts need root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    fx.write("src/journal/activemq-data-1.amq", b"journal");
    let _guard = MountGuard::new(&mnt);
    let (s, m) = (src.to_str().unwrap(), mnt.to_str().unwrap());

    // nothing mounted yet: a remount is refused, and mounts nothing
    run(helper_cmd().args([s, m, "-o", "ro,remount,backend=bind,nofail"]))
        .code(32)
        .stderr_has(&["cannot remount", m, s, "not mounted there"]);
    assert!(mounts_at(&mnt).is_empty(), "{:?}", mounts_at(&mnt));

    run(helper_cmd().args([s, m, "-o", "rw,backend=bind,nofail"])).code(0);
    assert!(mount_flags(&mnt).starts_with("rw"), "{}", mount_flags(&mnt));

    run(helper_cmd().args([s, m, "-v", "-o", "ro,remount,backend=bind,nofail"]))
        .code(0)
        .stdout_has(&["attempt 1/1", "remount,ro"]);
    assert!(mount_flags(&mnt).starts_with("ro"), "{}", mount_flags(&mnt));
    let err = fs::write(mnt.join("journal/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    run(helper_cmd().args([s, m, "-o", "rw,remount,backend=bind,nofail"])).code(0);
    assert!(mount_flags(&mnt).starts_with("rw"), "{}", mount_flags(&mnt));
    fs::write(mnt.join("journal/new"), b"x").unwrap();
    assert_eq!(fs::read(src.join("journal/new")).unwrap(), b"x");
}

/// A mount point elsewhere on the host whose name is not UTF-8 (the kernel escapes only white
/// space and `\` in mountinfo) made the whole mount table unreadable: the helper failed every
/// boot with exit 32 "cannot read the mount table ... stream did not contain valid UTF-8", and
/// `doctor` and the agent refused likewise. Run in a mount namespace of its own, so no other
/// test sees that mount.
#[test]
fn issue2_a_mount_point_that_is_not_utf8_elsewhere_does_not_stop_the_helper() {
    use std::os::unix::ffi::OsStrExt;
    if !require_root(
        "issue2_a_mount_point_that_is_not_utf8_elsewhere_does_not_stop_the_helper",
        "bind and tmpfs mounts need root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    let base = fx.mkdir("corda");
    fx.write("src/journal/activemq-data-1.amq", b"journal");
    let odd = fx.root.join(OsStr::from_bytes(b"label-\xff"));
    fs::create_dir(&odd).unwrap();
    let config = fx.write("agent.toml", bind_config(&base, &src, &mnt));
    // (the namespace, and every mount in it, ends with the shell)
    let script = "mount -t tmpfs tmpfs \"$1\" && \"$2\" \"$3\" \"$4\" -v -o backend=bind \
                  && \"$5\" -c \"$6\" mount";
    let out = run(std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&odd)
        .arg(workspace_bin("mount-artemis-sync"))
        .args([&src, &mnt])
        .arg(workspace_bin("artemis-sync"))
        .arg(&config));
    out.code(0).stdout_has(&[
        "attempt 1/8",
        "is already mounted on",
        "ok    mount",
        "ok    locks",
    ]);
    assert!(
        mounts_at(&mnt).is_empty(),
        "the mount stayed in its namespace"
    );
}
