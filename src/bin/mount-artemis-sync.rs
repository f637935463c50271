//! `mount.artemis-sync`: the helper mount(8) runs for fstab entries of type `artemis-sync`
//! (installed as `/sbin/mount.artemis-sync`). Exit codes follow mount(8).

use std::io::Write;
use std::process::ExitCode;

use artemis_sync::cli::MountHelperArgs as Args;
use artemis_sync::shared::mount::{mount, MountRequest, EXIT_USAGE};
use artemis_sync::sys::RealSys;
use clap::Parser;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    artemis_sync::logging::init(None, if args.verbose { "info" } else { "warn" });
    if let Some(ns) = &args.namespace {
        eprintln!("mount.artemis-sync: -N {ns}: mounting into another namespace is not supported");
        return ExitCode::from(EXIT_USAGE);
    }
    let result = MountRequest::from_helper_args(
        &args.spec,
        &args.dir,
        args.options.as_deref().unwrap_or(""),
    )
    .and_then(|mut req| {
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
            ExitCode::from(e.exit_code())
        }
    }
}
