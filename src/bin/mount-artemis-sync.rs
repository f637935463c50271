//! `mount.artemis-sync`: the helper mount(8) runs for fstab entries of type `artemis-sync`
//! (installed as `/sbin/mount.artemis-sync`). Exit codes follow mount(8).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use artemis_sync::mount::{mount, MountRequest, EXIT_USAGE};
use artemis_sync::sys::RealSys;
use clap::Parser;

const EXIT_CODES: &str = "\
Exit codes (as mount(8)):
  0   mounted, or already mounted from the same source
  1   usage: bad arguments or options, unknown backend, lock-breaking or secret option
  32  mount failure: mount point missing, mounted from elsewhere, server unreachable, mount failed

Environment:
  ARTEMIS_SYNC_MOUNT_PROGRAM  the mount program to run (default: mount, from PATH)
  ARTEMIS_SYNC_LOG            log filter (default: warn; -v gives info)";

/// mount(8) helper for fstab entries of type `artemis-sync`: mounts an EFS, Azure Files,
/// NFS, CIFS or bind share with the backend's recommended options, retrying while the
/// server is not reachable yet.
#[derive(Debug, Parser)]
#[command(name = "mount.artemis-sync", version, after_help = EXIT_CODES)]
struct Args {
    /// What to mount: `host:/path` (NFS, EFS), `//host/share` (SMB), or a directory (bind)
    spec: String,
    /// The mount point, an existing directory
    dir: PathBuf,
    /// Mount options: `backend=efs|azure-smb|azure-nfs|nfs|cifs|bind` plus ordinary mount
    /// options, which override the backend's defaults; `mount_attempts=N` and
    /// `mount_retry_max_ms=MS` bound the retries
    #[arg(short = 'o', value_name = "OPTS")]
    options: Option<String>,
    /// Sloppy: tolerate unknown options (passed on to mount)
    #[arg(short = 's')]
    sloppy: bool,
    /// Fake: print the mount command that would run, and mount nothing
    #[arg(short = 'f')]
    fake: bool,
    /// Do not write to the mount table (passed on to mount)
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Verbose: say what is being run
    #[arg(short = 'v')]
    verbose: bool,
    /// Filesystem type as mount(8) passes it (`artemis-sync`); informational
    #[arg(short = 't', value_name = "TYPE")]
    fs_type: Option<String>,
    /// Mount namespace (mount --namespace); not supported
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    artemis_sync::logging::init(None, if args.verbose { "info" } else { "warn" });
    if let Some(ns) = &args.namespace {
        eprintln!("mount.artemis-sync: -N {ns}: mounting into another namespace is not supported");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let result = MountRequest::from_helper_args(&args.spec, &args.dir, args.options.as_deref().unwrap_or("")).and_then(|mut req| {
        req.fake = args.fake;
        req.verbose = args.verbose;
        req.sloppy = args.sloppy;
        req.no_mtab = args.no_mtab;
        mount(&RealSys::from_env(), &req, &mut std::io::stdout())
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("mount.artemis-sync: {}", artemis_sync::error_chain(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
