//! The baselines measured in the same run as our figures: a plain TCP copy of the tree (the
//! ceiling), `cp -a` on the same filesystem, an rsync daemon on 127.0.0.1, and lsyncd (delay
//! 0, rsync -I) behind the same writer.

use super::*;

use artemis_sync::replicated::pages::ReadBuf;

pub(super) struct RsyncDaemon {
    pub(super) child: Child,
    pub(super) port: u16,
}

impl RsyncDaemon {
    pub(super) fn start(rsync: &Path, work: &Path, dir: &Path) -> Result<RsyncDaemon, BenchError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .map_err(err("pick a port"))?
            .local_addr()
            .map_err(err("pick a port"))?
            .port();
        let conf = work.join("rsyncd.conf");
        fs::write(&conf, format!("use chroot = no\npid file = {}\n[bench]\npath = {}\nread only = no\nuid = root\ngid = root\n", work.join("rsyncd.pid").display(), dir.display()))
            .map_err(err("write rsyncd.conf"))?;
        let child = Command::new(rsync)
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err("start the rsync daemon"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(BenchError::Step {
                    step: "start the rsync daemon".into(),
                    message: "it does not listen".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(RsyncDaemon { child, port })
    }

    /// Runs `rsync <args> src/ rsync://127.0.0.1:port/bench/`; returns the time and the bytes
    /// it moved over the wire (sent + received, from `--stats`).
    pub(super) fn push(
        &self,
        rsync: &Path,
        src: &Path,
        args: &[&str],
    ) -> Result<(Duration, u64), BenchError> {
        let start = Instant::now();
        let out = Command::new(rsync)
            .args(args)
            .arg("--stats")
            .arg(format!("{}/", src.display()))
            .arg(format!("rsync://127.0.0.1:{}/bench/", self.port))
            .output()
            .map_err(err("run rsync"))?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(BenchError::Step {
                step: "rsync".into(),
                message: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let num = |key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l[key.len()..].split_whitespace().next())
                .map(|v| v.replace(',', "").parse().unwrap_or(0))
                .unwrap_or(0)
        };
        Ok((
            took,
            num("Total bytes sent:") + num("Total bytes received:"),
        ))
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The plain copy's buffer: large reads and writes, as a copy tool tuned for throughput.
const PLAIN_COPY_BUF_BYTES: usize = 4 << 20;

/// Every regular file below `root`, with its path relative to it and its length, sorted.
fn tree_files(root: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let e = e?;
            let meta = e.metadata()?;
            let child = rel.join(e.file_name());
            if meta.is_dir() {
                dirs.push(child);
            } else if meta.is_file() {
                out.push((child, meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The honest ceiling for a copy over the network: every file of `src` sent over one plain
/// loopback TCP stream (a header of path and length, then the bytes, read in
/// [`PLAIN_COPY_BUF_BYTES`] chunks) and written into `dst`, each file fsynced at its end as the
/// cold side must; no hashing, no authentication, no framing beyond the header. Its buffers
/// are page-aligned, as ours are (a misaligned one slows the kernel's copies into it threefold
/// here: see [`ReadBuf`]).
pub(super) fn plain_copy(src: &Path, dst: &Path) -> Result<Duration, BenchError> {
    let e = err("plain copy");
    let files = tree_files(src).map_err(e)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("plain copy"))?;
    let port = listener.local_addr().map_err(err("plain copy"))?.port();
    let dst = dst.to_owned();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = ReadBuf::with_len(PLAIN_COPY_BUF_BYTES);
        loop {
            let mut len = [0u8; 2];
            match s.read_exact(&mut len) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                r => r?,
            }
            let mut name = vec![0u8; usize::from(u16::from_le_bytes(len))];
            s.read_exact(&mut name)?;
            let mut size = [0u8; 8];
            s.read_exact(&mut size)?;
            let path = dst.join(String::from_utf8_lossy(&name).as_ref());
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&path)?;
            let mut left = u64::from_le_bytes(size);
            while left > 0 {
                let chunk = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                s.read_exact(&mut buf[..chunk])?;
                f.write_all(&buf[..chunk])?;
                left -= chunk as u64;
            }
            f.sync_all()?;
        }
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(err("plain copy"))?;
    let mut buf = ReadBuf::with_len(PLAIN_COPY_BUF_BYTES);
    for (rel, len) in &files {
        let name = rel.to_string_lossy();
        let name_len = u16::try_from(name.len()).map_err(|_| BenchError::Step {
            step: "plain copy".into(),
            message: format!("path too long: {name}"),
        })?;
        s.write_all(&name_len.to_le_bytes())
            .map_err(err("plain copy"))?;
        s.write_all(name.as_bytes()).map_err(err("plain copy"))?;
        s.write_all(&len.to_le_bytes()).map_err(err("plain copy"))?;
        let mut f = File::open(src.join(rel)).map_err(err("plain copy"))?;
        let mut left = *len;
        while left > 0 {
            let chunk = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            f.read_exact(&mut buf[..chunk]).map_err(err("plain copy"))?;
            s.write_all(&buf[..chunk]).map_err(err("plain copy"))?;
            left -= chunk as u64;
        }
    }
    drop(s);
    receiver
        .join()
        .map_err(|_| BenchError::Step {
            step: "plain copy".into(),
            message: "receiver panicked".into(),
        })?
        .map_err(err("plain copy"))?;
    Ok(start.elapsed())
}

/// `cp -a src dst` on the same filesystem: the copy an operator would make by hand (no
/// network, no fsync).
pub(super) fn cp_copy(src: &Path, dst: &Path) -> Result<Duration, BenchError> {
    let start = Instant::now();
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .map_err(err("cp -a"))?;
    if !st.success() {
        return Err(BenchError::Step {
            step: "cp -a".into(),
            message: format!("cp exited {st}"),
        });
    }
    Ok(start.elapsed())
}

/// Runs lsyncd (delay 0, rsync -I) from `src` to `dst` for the writer; returns its p50 lag.
pub(super) fn lsyncd_lag(
    s: &Settings,
    root: &Path,
) -> Result<(Option<Value>, Option<String>), BenchError> {
    let (Some(lsyncd), Some(_rsync)) = (tool("lsyncd"), tool("rsync")) else {
        return Ok((
            None,
            Some("lsyncd or rsync is not installed (benches/compare.sh installs them)".into()),
        ));
    };
    let src = root.join("lsyncd-src");
    let dst = root.join("lsyncd-dst");
    fs::create_dir_all(&src).map_err(err("lsyncd"))?;
    fs::create_dir_all(&dst).map_err(err("lsyncd"))?;
    let conf = root.join("lsyncd.lua");
    fs::write(
        &conf,
        format!(
            "settings {{ nodaemon = true, insist = true }}\n\
             sync {{ default.rsync, source = {:?}, target = {:?}, delay = 0,\n  rsync = {{ binary = \"/usr/bin/rsync\", archive = true, _extra = {{ \"-I\" }} }} }}\n",
            src.display().to_string(),
            dst.display().to_string()
        ),
    )
    .map_err(err("lsyncd"))?;
    let log_path = root.join("lsyncd.log");
    let log = File::create(&log_path).map_err(err("lsyncd log"))?;
    let log2 = log.try_clone().map_err(err("lsyncd log"))?;
    let mut child = Command::new(lsyncd)
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(err("start lsyncd"))?;
    // ready once a marker written to the source shows up in the target
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0u32;
    while !dst.join(format!("ready.{n}")).exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((
                None,
                Some("lsyncd did not start syncing within 20 s".into()),
            ));
        }
        n += 1;
        fs::write(src.join(format!("ready.{n}")), b"x").map_err(err("lsyncd"))?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let cfg = WriterConfig {
        dir: src,
        rate_per_s: Some(s.rate),
        duration: Duration::from_secs(s.seconds.min(10)),
        file_bytes: workload::JOURNAL_FILE_BYTES,
        record_bytes: workload::RECORD_BYTES,
        sample_every: 10,
        paging: false,
        keep_files: None,
        first_file: 1,
    };
    let r = workload::run(&cfg, Some(&dst), |_| {}).map_err(err("lsyncd writer"));
    let _ = child.kill();
    let _ = child.wait();
    let r = r?;
    if r.lags.is_empty() {
        let tail: String = fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        return Ok((
            None,
            Some(format!(
                "lsyncd delivered none of the {} sampled records within {} s of their write (last log lines: {tail})",
                r.lost,
                workload::PROBE_TIMEOUT.as_secs()
            )),
        ));
    }
    Ok((Some(ms(quantile(&r.lags, 0.5))), None))
}
