//! Binary upgrade: the run directory (pidfile and one control socket per process), listener hand-over, cancel
//! requests that cross between the old and the new process, and the `pgrelay upgrade` command.
//!
//! Sequence of `pgrelay upgrade`: 1. start the new binary with the same config; 2. it asks the process named by the
//! pidfile for its listening socket over that process's control socket (SCM_RIGHTS), so both accept from one socket
//! and no connection queued in a backlog is reset when the old one stops; 3. once it accepts, it writes its PID into
//! the pidfile; 4. the old process gets SIGUSR2, stops accepting and keeps its clients until they leave.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::state::Shared;

/// Where the processes of one pgrelay instance meet: `<pidfile>` and `<pidfile>.<pid>.sock`.
pub struct RunDir {
    pidfile: PathBuf,
}

impl RunDir {
    /// The run dir of a config with `[proxy] pidfile`.
    pub fn of(shared: &Shared) -> Option<RunDir> {
        let cfg = shared.config.load();
        cfg.proxy.pidfile.as_ref().map(|p| RunDir { pidfile: cfg.resolve(p) })
    }

    /// The run dir of a pidfile path.
    pub fn at(pidfile: PathBuf) -> RunDir {
        RunDir { pidfile }
    }

    /// Control socket of process `pid`.
    pub fn ctl_path(&self, pid: u32) -> PathBuf {
        let mut s = self.pidfile.clone().into_os_string();
        s.push(format!(".{pid}.sock"));
        PathBuf::from(s)
    }

    /// The PID in the pidfile, if that process is alive.
    pub fn running_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// Writes our PID (atomically: a reader sees the old PID or the new one).
    pub fn write_pid(&self) -> std::io::Result<()> {
        let mut tmp = self.pidfile.clone().into_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
        std::fs::rename(&tmp, &self.pidfile)
    }

    /// Removes the pidfile if it still names us (a successor has overwritten it otherwise).
    pub fn remove_pid(&self) {
        let ours = std::fs::read_to_string(&self.pidfile).ok().and_then(|t| t.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.pidfile);
        }
    }

    /// Control sockets of the other live processes of this instance.
    fn peers(&self) -> Vec<PathBuf> {
        let (Some(dir), Some(name)) = (self.pidfile.parent(), self.pidfile.file_name()) else { return Vec::new() };
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let prefix = format!("{}.", name.to_string_lossy());
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let pid: u32 = n.strip_prefix(&prefix)?.strip_suffix(".sock")?.parse().ok()?;
                (pid != me && alive(pid)).then(|| e.path())
            })
            .collect()
    }

    /// Sends a cancel request we cannot place to the other processes; the one that issued the key acts on it.
    pub async fn forward_cancel(&self, key: (i32, i32)) {
        let peers = self.peers();
        let r = tokio::task::spawn_blocking(move || {
            for p in peers {
                match ask_cancel(&p, key) {
                    Ok(true) => return Some(p),
                    Ok(false) => {}
                    Err(e) => debug!(peer = %p.display(), error = %e, "cancel forward failed"),
                }
            }
            None
        })
        .await;
        match r {
            Ok(Some(p)) => info!(peer = %p.display(), "cancel request forwarded to the other pgrelay process"),
            _ => debug!("cancel request for unknown client ignored"),
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

fn ask_cancel(path: &Path, key: (i32, i32)) -> std::io::Result<bool> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut msg = [0u8; 9];
    msg[0] = b'C';
    msg[1..5].copy_from_slice(&key.0.to_be_bytes());
    msg[5..9].copy_from_slice(&key.1.to_be_bytes());
    s.write_all(&msg)?;
    let mut a = [0u8; 1];
    s.read_exact(&mut a)?;
    Ok(a[0] == b'Y')
}

/// The first 8 bytes of a CancelRequest: length 16, code 80877102.
const CANCEL_HEADER: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];

/// Looks at (without consuming) the first bytes of a new connection: `Some(key)` if it is a CancelRequest.
pub async fn peek_cancel(sock: &TcpStream) -> Option<(i32, i32)> {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    for _ in 0..100 {
        let n = tokio::time::timeout_at(deadline, sock.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 || buf[..n.min(8)] != CANCEL_HEADER[..n.min(8)] {
            return None;
        }
        if n == 16 {
            let pid = i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
            let key = i32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
            return Some((pid, key));
        }
        // A split CancelRequest: peek again shortly (the socket stays readable, so no spinning on readiness).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// A process's control socket: hands its listener to a successor, places forwarded cancel requests.
pub struct Control {
    path: PathBuf,
    listener_fd: Arc<Mutex<Option<OwnedFd>>>,
}

impl Control {
    /// Opens `path` and serves it on a thread (a handful of requests per upgrade).
    pub fn start(shared: Arc<Shared>, path: PathBuf, listener: &TcpListener) -> std::io::Result<Control> {
        let _ = std::fs::remove_file(&path);
        let ul = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let listener_fd = Arc::new(Mutex::new(Some(listener.as_fd().try_clone_to_owned()?)));
        let fd = listener_fd.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new().name("pgrelay-control".into()).spawn(move || {
            for s in ul.incoming() {
                match s {
                    Ok(s) => {
                        if let Err(e) = serve_control(&shared, &rt, &fd, s) {
                            debug!(error = %e, "control request failed");
                        }
                    }
                    Err(e) => warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
        Ok(Control { path, listener_fd })
    }

    /// We stopped accepting: a process starting now must bind its own socket rather than share a dead one.
    pub fn stop_handover(&self) {
        self.listener_fd.lock().take();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_control(
    shared: &Arc<Shared>,
    rt: &tokio::runtime::Handle,
    fd: &Mutex<Option<OwnedFd>>,
    mut s: UnixStream,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut op = [0u8; 1];
    s.read_exact(&mut op)?;
    match op[0] {
        b'L' => {
            let guard = fd.lock();
            match guard.as_ref() {
                Some(l) => {
                    send_fd(&s, l.as_raw_fd())?;
                    info!("handed the listening socket to a new pgrelay process");
                }
                None => s.write_all(b"N")?,
            }
        }
        b'C' => {
            let mut k = [0u8; 8];
            s.read_exact(&mut k)?;
            let key = (i32::from_be_bytes([k[0], k[1], k[2], k[3]]), i32::from_be_bytes([k[4], k[5], k[6], k[7]]));
            let found = shared.cancel_keys.get(&key).map(|c| c.clone());
            match found {
                Some(info) => {
                    let tls = shared.config.load().proxy.server_tls.0.clone();
                    rt.spawn(async move { crate::client::cancel_client(&info, tls.as_deref()).await });
                    s.write_all(b"Y")?;
                }
                None => s.write_all(b"N")?,
            }
        }
        _ => {}
    }
    Ok(())
}

/// Asks the process behind `ctl` for its listening socket.
pub fn take_listener(ctl: &Path) -> std::io::Result<std::net::TcpListener> {
    let mut s = UnixStream::connect(ctl)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"L")?;
    let fd = recv_fd(&s)?;
    // SAFETY: recv_fd returned a descriptor we now own (SCM_RIGHTS installs a new fd in this process).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(std::net::TcpListener::from(owned))
}

/// Buffer for one SCM_RIGHTS control message, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

fn send_fd(s: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    let byte = [b'L'];
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; every pointer set below points into locals that outlive the sendmsg call, and
    // CMSG_SPACE(sizeof(int)) fits in the 64-byte aligned buffer.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &fd as *const RawFd as *const u8,
            libc::CMSG_DATA(c),
            std::mem::size_of::<RawFd>(),
        );
        if libc::sendmsg(s.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fd(s: &UnixStream) -> std::io::Result<RawFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr() as *mut libc::c_void, iov_len: 1 };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: as in send_fd; the kernel writes at most msg_controllen bytes into the aligned buffer, and the
    // control message is read only after checking its level, type and length.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cbuf.0.len() as _;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 || byte[0] != b'L' {
            return Err(std::io::Error::other("the running process no longer accepts (it is stopping)"));
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null()
            || (*c).cmsg_level != libc::SOL_SOCKET
            || (*c).cmsg_type != libc::SCM_RIGHTS
            || ((*c).cmsg_len as usize) < libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize
        {
            return Err(std::io::Error::other("no descriptor in the answer"));
        }
        let mut fd: RawFd = -1;
        std::ptr::copy_nonoverlapping(
            libc::CMSG_DATA(c),
            &mut fd as *mut RawFd as *mut u8,
            std::mem::size_of::<RawFd>(),
        );
        Ok(fd)
    }
}

/// `pgrelay upgrade`: starts `binary` with `config`, waits until it accepts, then retires the running process
/// (SIGUSR2, or SIGTERM with `drain`). Prints what it did; an error leaves the running process untouched.
pub fn upgrade(config: &Path, binary: &Path, log: Option<&Path>, drain: bool, wait: bool) -> Result<(), String> {
    let cfg = crate::config::Config::load(config).map_err(|e| e.to_string())?;
    let pidfile = cfg.proxy.pidfile.as_ref().map(|p| cfg.resolve(p)).ok_or("proxy.pidfile: needed for upgrade")?;
    let rd = RunDir::at(pidfile.clone());
    let old = rd.running_pid().ok_or_else(|| format!("{}: no running pgrelay", pidfile.display()))?;
    let out = match log {
        Some(l) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l)
            .map_err(|e| format!("{}: {e}", l.display()))?
            .into(),
        None => std::process::Stdio::inherit(),
    };
    let err = match log {
        Some(l) => std::fs::OpenOptions::new().append(true).open(l).map_err(|e| e.to_string())?.into(),
        None => std::process::Stdio::inherit(),
    };
    // Its own process group, so a Ctrl-C at the terminal that ran the upgrade does not reach the new proxy.
    let mut child = std::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let new = child.id();
    println!("started {} (pid {new}); waiting until it accepts", binary.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("new process exited before accepting ({st}); pid {old} keeps running"));
        }
        if rd.running_pid() == Some(new) {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("new process not ready after 30 s; killed it, pid {old} keeps running"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sig, what) = if drain { (libc::SIGTERM, "SIGTERM (drain)") } else { (libc::SIGUSR2, "SIGUSR2 (retire)") };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(old as libc::pid_t, sig) } != 0 {
        return Err(format!("signal to pid {old}: {}", std::io::Error::last_os_error()));
    }
    println!("pid {new} accepts; sent {what} to pid {old}");
    if wait {
        while alive(old) {
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("pid {old} exited");
    }
    Ok(())
}
