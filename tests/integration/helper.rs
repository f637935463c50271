//! `mount-artemis-sync SPEC DIR [-sfnv] [-o OPTS]`, the helper mount(8) runs, with the mount
//! program replaced by scripts (ARTEMIS_SYNC_MOUNT_PROGRAM) that record what they were given.

use std::fs;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::*;

/// A mount program that leaves a file behind if it is ever run.
fn marker_program(fx: &Fixture) -> (PathBuf, PathBuf) {
    let marker = fx.path("mount-program-ran");
    let program = write_script(
        &fx.path("marker-mount"),
        &format!("touch '{}'\nexit 0", marker.display()),
    );
    (program, marker)
}

/// Runs the helper with the mount program replaced by `program`.
fn helper(program: &Path, args: &[&str]) -> Output {
    run(helper_cmd()
        .env("ARTEMIS_SYNC_MOUNT_PROGRAM", program)
        .args(args))
}

#[test]
fn issue2_helper_fake_prints_the_efs_mount_and_runs_nothing() {
    let fx = Fixture::new();
    let (program, marker) = marker_program(&fx);
    let out = helper(
        &program,
        &[EFS_SOURCE, "/mnt/x", "-f", "-v", "-o", "backend=efs"],
    );
    out.code(0)
        .stdout_has(&["-t nfs4", &format!("-o {EFS_OPTIONS} {EFS_SOURCE} /mnt/x")]);
    assert!(!marker.exists(), "-f ran the mount program:\n{out}");
}

#[test]
fn helper_usage_errors_exit_1_and_run_nothing() {
    let fx = Fixture::new();
    let (program, marker) = marker_program(&fx);
    let dir = fx.mkdir("mnt");
    let d = dir.to_str().unwrap();
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("missing DIR", &[EFS_SOURCE], &["<DIR>"]),
        (
            "no backend=",
            &[EFS_SOURCE, d, "-o", "hard"],
            &["no `backend=`"],
        ),
        ("no -o at all", &[EFS_SOURCE, d], &["no `backend=`"]),
        (
            "unknown backend",
            &[EFS_SOURCE, d, "-o", "backend=gluster"],
            &["unknown backend `gluster`"],
        ),
        (
            "= in a value",
            &[EFS_SOURCE, d, "-o", "backend=efs,sec=a=b"],
            &["sec=a=b", "may not contain `=`"],
        ),
        (
            "nolock",
            &[EFS_SOURCE, d, "-o", "backend=efs,nolock"],
            &["`nolock`", EFS_SOURCE],
        ),
        (
            "local_lock",
            &[EFS_SOURCE, d, "-o", "backend=nfs,local_lock=all"],
            &["local_lock=all"],
        ),
        (
            "nobrl",
            &["//srv/share", d, "-o", "backend=cifs,nobrl"],
            &["`nobrl`"],
        ),
        (
            "password=",
            &[
                "//srv/share",
                d,
                "-o",
                "backend=cifs,username=u,password=hunter2",
            ],
            &["`password=`", "credentials file"],
        ),
        (
            "bad mount_attempts",
            &[EFS_SOURCE, d, "-o", "backend=efs,mount_attempts=lots"],
            &["mount_attempts=lots"],
        ),
        (
            "source of the wrong form",
            &["nfs-server", d, "-o", "backend=nfs"],
            &["nfs-server", "host:/path"],
        ),
        (
            "premounted",
            &["x", d, "-o", "backend=premounted"],
            &["premounted"],
        ),
        (
            "azure-smb without credentials",
            &[
                "//acct.file.core.windows.net/corda",
                d,
                "-o",
                "backend=azure-smb",
            ],
            &["credentials=<file>"],
        ),
        (
            "namespace",
            &[EFS_SOURCE, d, "-N", "1", "-o", "backend=efs"],
            &["namespace"],
        ),
    ];
    for (name, args, needles) in cases {
        let out = helper(&program, args);
        assert_eq!(out.status.code(), Some(1), "case {name:?}:\n{out}");
        for n in *needles {
            assert!(
                out.stderr.contains(n),
                "case {name:?}: stderr lacks {n:?}:\n{out}"
            );
        }
        assert!(
            !out.stderr.contains("hunter2"),
            "case {name:?} printed the password:\n{out}"
        );
        assert!(
            !marker.exists(),
            "case {name:?} ran the mount program:\n{out}"
        );
    }
    assert!(names(&dir).is_empty());
}

#[test]
fn helper_missing_mount_point_exits_32_naming_it() {
    let fx = Fixture::new();
    let (program, marker) = marker_program(&fx);
    let missing = fx.path("no/such/mnt");
    let out = helper(
        &program,
        &[EFS_SOURCE, missing.to_str().unwrap(), "-o", "backend=efs"],
    );
    out.code(32)
        .stderr_has(&[&missing.display().to_string(), "No such file"]);
    assert!(!marker.exists(), "{out}");
    assert!(!missing.exists(), "the helper created the mount point");
}

#[test]
fn helper_names_a_mount_program_that_cannot_run() {
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    let program = fx.path("no-such-mount");
    let out = helper(
        &program,
        &[
            src.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "-o",
            "backend=bind",
        ],
    );
    out.code(32).stderr_has(&[&program.display().to_string()]);
}

/// A listener on the SMB port of 127.0.0.1, so that the helper's reachability probe succeeds;
/// `None` when the port cannot be had.
fn smb_port_listener() -> Option<Option<TcpListener>> {
    match TcpListener::bind("127.0.0.1:445") {
        Ok(l) => Some(Some(l)),
        // someone already listens: the probe will succeed as well
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            TcpStream::connect("127.0.0.1:445").ok().map(|_| None)
        }
        Err(_) => None,
    }
}

#[test]
fn issue2_helper_passes_the_credentials_file_never_the_password() {
    if !require_root(
        "issue2_helper_passes_the_credentials_file_never_the_password",
        "the credentials file must be owned by root and port 445 needs root",
    ) {
        return;
    }
    let Some(_listener) = smb_port_listener() else {
        skip(
            "issue2_helper_passes_the_credentials_file_never_the_password",
            "cannot listen on 127.0.0.1:445",
        );
        return;
    };
    let fx = Fixture::new();
    let mnt = fx.mkdir("mnt");
    let cred = fx.write("azure.cred", "username=acct\npassword=s3cret\n");
    chmod(&cred, 0o600);
    let argv = fx.path("argv");
    let env = fx.path("env");
    let program = write_script(
        &fx.path("record-mount"),
        &format!(
            "printf '%s\\n' \"$@\" > '{}'\nenv > '{}'\nexit 0",
            argv.display(),
            env.display()
        ),
    );
    let opts = format!(
        "backend=azure-smb,_netdev,nofail,credentials={},mount_attempts=1",
        cred.display()
    );
    let spec = "//127.0.0.1/corda";
    let out = helper(&program, &[spec, mnt.to_str().unwrap(), "-o", &opts]);
    out.code(0).nowhere("s3cret");
    let recorded = fs::read_to_string(&argv).expect("the mount program ran");
    let args: Vec<&str> = recorded.lines().collect();
    assert_eq!(
        args,
        [
            "-t",
            "cifs",
            "-o",
            &format!(
                "vers=3.1.1,serverino,nosharesock,actimeo=30,mfsymlinks,credentials={}",
                cred.display()
            ),
            spec,
            mnt.to_str().unwrap(),
        ],
        "{out}"
    );
    assert!(
        !recorded.contains("s3cret"),
        "the password reached argv: {recorded}"
    );
    let environment = fs::read_to_string(&env).unwrap();
    assert!(
        !environment.contains("s3cret"),
        "the password reached the environment"
    );
    assert!(
        !environment.contains("PASSWD="),
        "PASSWD was set for the mount program"
    );
    assert_eq!(
        fs::read_to_string(&cred).unwrap(),
        "username=acct\npassword=s3cret\n"
    );

    // A credentials file others can read is refused before anything runs.
    fs::remove_file(&argv).unwrap();
    chmod(&cred, 0o644);
    let out = helper(&program, &[spec, mnt.to_str().unwrap(), "-o", &opts]);
    out.code(1)
        .stderr_has(&[
            &cred.display().to_string(),
            &format!("chmod 600 {}", cred.display()),
        ])
        .nowhere("s3cret");
    assert!(
        !argv.exists(),
        "the mount program ran with a readable credentials file"
    );
}

#[test]
fn issue2_helper_retries_a_failing_mount_program_until_it_succeeds() {
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    fx.write("src/journal/activemq-data-1.amq", b"journal bytes");
    let before = snapshot(&src);
    let counter = fx.path("count");
    let program = write_script(
        &fx.path("flaky-mount"),
        &format!(
            "n=$(cat '{c}' 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > '{c}'\n\
             if [ $n -lt 3 ]; then echo \"mount: flaky failure number $n\" >&2; exit 32; fi\nexit 0",
            c = counter.display()
        ),
    );
    let out = helper(
        &program,
        &[
            src.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "-o",
            "backend=bind,mount_retry_max_ms=50",
        ],
    );
    out.code(0)
        .stderr_has(&["flaky failure number 1", "flaky failure number 2"]);
    assert_eq!(fs::read_to_string(&counter).unwrap().trim(), "3", "{out}");
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
    assert_eq!(snapshot(&src), before);
    assert!(names(&mnt).is_empty());
}

#[test]
fn issue2_helper_gives_up_after_the_bounded_attempts() {
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    let counter = fx.path("count");
    let program = write_script(
        &fx.path("failing-mount"),
        &format!(
            "n=$(cat '{c}' 2>/dev/null || echo 0)\necho $((n + 1)) > '{c}'\n\
             echo 'mount: special device gone (fake error 7f3a)' >&2\nexit 32",
            c = counter.display()
        ),
    );
    let out = helper(
        &program,
        &[
            src.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "-o",
            "backend=bind,mount_attempts=2,mount_retry_max_ms=50",
        ],
    );
    out.code(32).stderr_has(&[
        "special device gone (fake error 7f3a)",
        "after 2 attempt(s)",
        &src.display().to_string(),
        &mnt.display().to_string(),
    ]);
    assert_eq!(fs::read_to_string(&counter).unwrap().trim(), "2", "{out}");
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
}

#[test]
fn helper_passes_flags_on_and_drops_userspace_options() {
    let fx = Fixture::new();
    let src = fx.mkdir("src");
    let mnt = fx.mkdir("mnt");
    let argv = fx.path("argv");
    let program = write_script(
        &fx.path("record-mount"),
        &format!("printf '%s\\n' \"$@\" > '{}'", argv.display()),
    );
    let (s, m) = (src.to_str().unwrap(), mnt.to_str().unwrap());
    let out = helper(
        &program,
        &[s, m, "-s", "-n", "-t", "artemis-sync", "-o",
          "backend=bind,_netdev,nofail,defaults,noauto,x-systemd.automount,x-systemd.mount-timeout=30,ro"],
    );
    out.code(0);
    let recorded = fs::read_to_string(&argv).expect("the mount program ran");
    assert_eq!(
        recorded.lines().collect::<Vec<_>>(),
        ["-s", "-n", "--bind", "-o", "ro", s, m],
        "{out}"
    );
}
